"""`python -m convert.onnx ARGS` = `mlx-sdxs export onnx ARGS`."""

import sys

from mlx_sdxs.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", "onnx", *sys.argv[1:]]))
