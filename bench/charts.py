"""Charting with matplotlib (the `bench` extra): a stacked per-stage bar per backend and size, an FPS chart, and
the streams bench's aggregate FPS per stream count. Without matplotlib the bench still writes its JSON and
markdown, and says so."""

from __future__ import annotations

from pathlib import Path

STAGE_COLOURS = {"preprocess": "#9e9e9e", "encode": "#4c72b0", "unet": "#dd8452", "decode": "#55a868",
                 "postprocess": "#c4c4c4"}


def _pyplot():
    """matplotlib's pyplot drawing to files, or None (said once on stdout) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: no charts (matplotlib is not installed: pip install 'mlx-sdxs[bench]')", flush=True)
        return None
    return plt


def _device_title(info: dict) -> str:
    return f"{info['cpu']} · MLX {info['dtype']}, {info['kernels']} kernels"


def write_charts(report: dict, stem: Path) -> list[Path]:
    """`<stem>.png` (stage times) and `<stem>-fps.png` (FPS); returns the files written ([] without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return []
    rows = [(f"{name} @ {size}", entry) for size, backends in report["sizes"].items()
            for name, entry in backends.items() if "skipped" not in entry]
    if not rows:
        return []
    device = _device_title(report["system"])
    written = []

    figure, axes = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.6))
    labels = [label for label, _ in rows][::-1]
    left = [0.0] * len(rows)
    for stage, colour in STAGE_COLOURS.items():
        widths = [entry["stages_ms"][stage]["median"] or 0.0 for _, entry in rows][::-1]
        axes.barh(labels, widths, left=left, color=colour, label=stage)
        left = [a + b for a, b in zip(left, widths)]
    axes.set_xlabel("ms per frame (median; lower is better)")
    axes.set_title(f"Per-stage time per frame\n{device}", fontsize=10)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path = stem.with_suffix(".png")
    figure.savefig(path, dpi=120)
    written.append(path)

    figure, axes = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.6))
    positions = range(len(rows))
    standalone = [entry["standalone_fps"] for _, entry in rows][::-1]
    loop = [entry.get("loop_fps") or 0.0 for _, entry in rows][::-1]
    axes.barh([p + 0.2 for p in positions], standalone, height=0.4, color="#4c72b0", label="standalone")
    axes.barh([p - 0.2 for p in positions], loop, height=0.4, color="#dd8452", label="in the 3-thread loop (AI FPS)")
    axes.set_yticks(list(positions), labels)
    axes.set_xlabel("frames per second (higher is better)")
    axes.set_title(f"Throughput\n{device}", fontsize=10)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path = stem.with_name(stem.name + "-fps.png")
    figure.savefig(path, dpi=120)
    written.append(path)
    plt.close("all")
    return written


def write_streams_chart(report: dict, stem: Path) -> list[Path]:
    """`<stem>.png`: the streams bench's aggregate AI FPS against the stream count, a line per backend, size and
    mode; returns the files written ([] without matplotlib or without a measured cell)."""
    lines = {}
    for size, backends in report["sizes"].items():
        for backend, counts in backends.items():
            for count, modes in counts.items():
                for mode, entry in modes.items():
                    if "skipped" not in entry:
                        point = (int(count), entry["aggregate_fps"])
                        lines.setdefault(f"{backend} {mode} @ {size}²", []).append(point)
    plt = _pyplot() if lines else None
    if plt is None:
        return []
    figure, axes = plt.subplots(figsize=(8, 5))
    for label, points in lines.items():
        points.sort()
        axes.plot([n for n, _ in points], [fps for _, fps in points], marker="o", label=label)
    counts = sorted({n for points in lines.values() for n, _ in points})
    axes.set_xticks(counts)
    axes.set_xlabel("camera streams")
    axes.set_ylabel("aggregate AI FPS (all streams; higher is better)")
    axes.set_ylim(bottom=0)
    axes.set_title(f"Streams: one process batched vs independent processes\n{_device_title(report['system'])}",
                   fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = stem.with_suffix(".png")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return [path]
