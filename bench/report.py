"""Reporting: the JSON report and the markdown table. Cells that did not run read "—", with the reason
below the table; nothing prints as nan."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from bench.inputs import CONTROLNET_SUFFIX

#: Where every bench command writes its results by default (those the README quotes are copied to bench/results/).
RUNS = Path("bench/results/runs")

COLUMNS = ("size", "backend", "encode ms", "UNet ms", "decode ms", "enc+UNet+dec ms", "best frame ms", "× MLX time",
           "standalone FPS", "loop FPS", "loop/standalone", "UNet GFLOP/s", "threads")
DASH = "—"


def cell(value, digits: int) -> str:
    """A number for a table, or the dash of a cell that has none."""
    return DASH if value is None else f"{value:.{digits}f}"


def controlnet_costs(report: dict) -> list[str]:
    """A line per backend that ran both a ControlNet model's frame and its plain base model's."""
    lines = []
    for size, rows in report["sizes"].items():
        for name, entry in rows.items():
            plain = rows.get(name.removesuffix(CONTROLNET_SUFFIX), {"skipped": True})
            if name.endswith(CONTROLNET_SUFFIX) and "skipped" not in entry and "skipped" not in plain:
                with_, without = entry["encode_unet_decode_ms"], plain["encode_unet_decode_ms"]
                lines.append(f"- {name} @ {size}: {with_:.1f} ms with the ControlNet vs {without:.1f} ms without "
                             f"(×{with_ / without:.2f})")
    return lines


def device_line(info: dict) -> str:
    """The machine a run measured (`system.system_info`), as every report's first line says it."""
    return (f"Device: {info['cpu']} ({info['cpu_count']} cores), {info['os']}; MLX {info['mlx']} on "
            f"{info['mlx_device']} with {info['mlx_blas']}; MLX dtype {info['dtype']}, kernels {info['kernels']} "
            f"(policy {info['kernels_requested']}; native: {info['native_kernels']})"
            + (f"; torch on {info['torch_device']}" if info.get("torch_device") else ""))


def markdown(report: dict) -> str:
    info = report["system"]
    lines = [device_line(info) + f"; frames: {info['frames']}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    notes = []
    for size, backends in report["sizes"].items():
        for name, e in backends.items():
            if "skipped" in e:
                notes.append(f"- {name} @ {size}: {e['skipped']}")
                lines.append(f"| {size} | {name} | " + " | ".join([DASH] * (len(COLUMNS) - 2)) + " |")
                continue
            s = e["stages_ms"]
            cells = [size, name, cell(s["encode"]["median"], 0), cell(s["unet"]["median"], 0),
                     cell(s["decode"]["median"], 0), cell(e["encode_unet_decode_ms"], 0),
                     cell(e["encode_unet_decode_best_ms"], 0), cell(e.get("time_vs_mlx"), 2),
                     cell(e["standalone_fps"], 2), cell(e.get("loop_fps"), 2), cell(e.get("loop_vs_standalone"), 2),
                     cell(e.get("unet_gflops_per_s"), 0), DASH if e.get("threads") is None else str(e["threads"])]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    costs = controlnet_costs(report)
    if costs:
        lines += ["", "The ControlNet model's frame (enc+UNet+dec, its UNet stage running ControlNet + UNet) beside "
                      "the plain base model's:", *costs]
    if notes:
        lines += ["", "Not run:", *notes]
    primitives = report.get("primitives")
    if primitives:
        first = next(iter(primitives.values()))
        lines += ["", f"MLX primitives one compiled camera frame evaluates on {info['mlx_device']} ({first['kernels']} "
                      f"kernels, {first['dtype']}; views excluded): "
                      + ", ".join(f"{size}: {p['frame']}" for size, p in primitives.items())]
    return "\n".join(lines) + "\n"


def write_results(out: Path, kind: str, report: dict, table: str, draw: Callable[[dict, Path], list[Path]]) -> Path:
    """`out/<kind>-<time>.json` (the report) and `.md` (its table), each written whole or not at all, and the
    charts `draw` makes; prints the table and what was written, and returns the files' stem."""
    stem = run_stem(out, kind)
    for suffix, text in ((".json", json.dumps(report, indent=2)), (".md", table)):
        partial = stem.with_name(f".{stem.name}{suffix}.partial")
        partial.write_text(text)
        os.replace(partial, stem.with_suffix(suffix))
    charts = draw(report, stem)
    print(table)
    print(f"bench: wrote {stem}.json, {stem}.md" + "".join(f", {c}" for c in charts), flush=True)
    return stem


def run_stem(out: Path, kind: str) -> Path:
    """`out/<kind>-<date>-<time>`: a run's results file without its suffix (`out` is made if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
