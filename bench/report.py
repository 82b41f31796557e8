"""Reporting: the JSON report and the markdown table. Cells that did not run read "—", with the reason
below the table; nothing prints as nan."""

from __future__ import annotations

COLUMNS = ("size", "backend", "encode ms", "UNet ms", "decode ms", "enc+UNet+dec ms", "best frame ms", "× MLX time",
           "standalone FPS", "loop FPS", "loop/standalone", "UNet GFLOP/s", "threads")
DASH = "—"


def _cell(value, digits: int) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    info = report["system"]
    lines = [f"Device: {info['cpu']} ({info['cpu_count']} cores), {info['os']}; MLX {info['mlx']} on "
             f"{info['mlx_device']} with {info['mlx_blas']}; MLX dtype {info['dtype']}, kernels {info['kernels']} "
             f"(policy {info['kernels_requested']}; native: {info['native_kernels']})"
             + (f"; torch on {info['torch_device']}" if info.get("torch_device") else "")
             + f"; frames: {info['frames']}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    notes = []
    for size, backends in report["sizes"].items():
        for name, e in backends.items():
            if "skipped" in e:
                notes.append(f"- {name} @ {size}: {e['skipped']}")
                lines.append(f"| {size} | {name} | " + " | ".join([DASH] * (len(COLUMNS) - 2)) + " |")
                continue
            s = e["stages_ms"]
            cells = [size, name, _cell(s["encode"]["median"], 0), _cell(s["unet"]["median"], 0),
                     _cell(s["decode"]["median"], 0), _cell(e["encode_unet_decode_ms"], 0),
                     _cell(e["encode_unet_decode_best_ms"], 0), _cell(e.get("time_vs_mlx"), 2),
                     _cell(e["standalone_fps"], 2), _cell(e.get("loop_fps"), 2), _cell(e.get("loop_vs_standalone"), 2),
                     _cell(e.get("unet_gflops_per_s"), 0), DASH if e.get("threads") is None else str(e["threads"])]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    if notes:
        lines += ["", "Not run:", *notes]
    primitives = report.get("primitives")
    if primitives:
        first = next(iter(primitives.values()))
        lines += ["", f"MLX primitives one compiled camera frame evaluates on {info['mlx_device']} ({first['kernels']} "
                      f"kernels, {first['dtype']}; views excluded): "
                      + ", ".join(f"{size}: {p['frame']}" for size, p in primitives.items())]
    return "\n".join(lines) + "\n"
