"""Thin commands for a checkout: `python -m convert.mlx|coreml|onnx …` run what the installed CLI runs as
`mlx-sdxs convert …` and `mlx-sdxs export coreml|onnx …` (the code lives in `mlx_sdxs.convert` and
`mlx_sdxs.backends.export`, shipped in the wheel)."""
