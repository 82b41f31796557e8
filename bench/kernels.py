"""Each CPU rewrite against the MLX built-in, per shape, on the shapes one camera frame really runs.

    python -m bench.kernels [--preset sdxs-512-0.9] [--sizes 256,512] [--repeats 5] [--out bench/results]

One frame of the UNet and TAESD is traced with a recording op set to collect every (op, shape) it
calls; then each distinct one is timed with the `portable` ops and with the CPU rewrites, interleaved
(A, B, A, B …, median of `--repeats`), so the host's slow spells hit both alike. The table says, per
shape, which is faster and how much of a frame it is; `models/cpu_ops.py`'s rules follow it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import mlx_sdxs  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx

from bench.report import RUNS, run_stem
from mlx_sdxs import presets, runtime
from mlx_sdxs.models.cpu_ops import CPUOps
from mlx_sdxs.models.ops import PORTABLE, PortableOps, set_ops
from mlx_sdxs.weights import build_model, prepare

CPU = CPUOps()


class Recorder(PortableOps):
    """Portable ops that remember each call's op, layer and input shapes."""

    name = "recorder"

    def __init__(self):
        self.calls: Counter = Counter()
        self.examples: dict = {}

    def _note(self, key, example):
        self.calls[key] += 1
        self.examples.setdefault(key, example)

    def conv2d(self, conv, x, residual=None, activation=None):
        out_c, kh, kw, in_c = conv.weight.shape
        key = ("conv2d", f"{kh}x{kw}/{conv.stride[0]} {in_c}->{out_c} @{x.shape[1]}x{x.shape[2]}")
        self._note(key, (conv, x.shape))
        return super().conv2d(conv, x, residual, activation)

    def group_norm(self, norm, x, with_silu=False):
        key = ("group_norm" + ("+silu" if with_silu else ""), f"{x.shape[-1]}ch @{'x'.join(map(str, x.shape[1:-1]))}")
        self._note(key, (norm, x.shape, with_silu))
        return super().group_norm(norm, x, with_silu)

    def attention(self, q, k, v, scale, causal=False):
        key = ("attention", f"{q.shape[1]}h {q.shape[2]}q x {k.shape[2]}k d{q.shape[3]}")
        self._note(key, (q.shape, k.shape, scale))
        return super().attention(q, k, v, scale, causal)

    def silu(self, x):
        self._note(("silu", str(x.shape)), (x.shape,))
        return super().silu(x)

    def geglu(self, value, gate):
        self._note(("geglu", str(value.shape)), (value.shape,))
        return super().geglu(value, gate)


def _runner(op: str, example, ops: PortableOps):
    """A zero-argument call of `ops` on fresh random inputs of the recorded shapes."""
    if op == "conv2d":
        conv, shape = example
        x = mx.random.normal(shape)
        return lambda: ops.conv2d(conv, x)
    if op.startswith("group_norm"):
        norm, shape, with_silu = example
        x = mx.random.normal(shape)
        return lambda: ops.group_norm(norm, x, with_silu)
    if op == "attention":
        q_shape, k_shape, scale = example
        q, k, v = mx.random.normal(q_shape), mx.random.normal(k_shape), mx.random.normal(k_shape)
        return lambda: ops.attention(q, k, v, scale)
    (shape,) = example
    a, b = mx.random.normal(shape), mx.random.normal(shape)
    return (lambda: ops.silu(a)) if op == "silu" else (lambda: ops.geglu(a, b))


def _time(fn) -> float:
    start = time.perf_counter()
    mx.eval(fn())
    return (time.perf_counter() - start) * 1000


def trace(preset: str, size: int, components: tuple[str, ...]) -> list[tuple[str, Recorder]]:
    """(model name, recorder) after one UNet forward and one TAESD encode + decode at render size `size`."""
    configs = presets.configs(preset)
    traced = []
    for component in components:
        model = prepare(build_model(configs[component], component), mx.float32, "portable")
        recorder = Recorder()
        set_ops(model, recorder)
        side = size // 8
        if component == "unet":
            context = mx.random.normal((1, 77, model.config.down_levels[0].cross_attention_dim))
            mx.eval(model(mx.random.normal((1, side, side, 4)), 999, context))
        else:
            mx.eval(model.decode(model.encode(mx.random.normal((1, size, size, 3)))))
        traced.append((component, recorder))
    return traced


def measure(preset: str, sizes: list[int], repeats: int, components: tuple[str, ...] = ("unet", "vae")) -> list[dict]:
    rows = []
    for size in sizes:
        for component, recorder in trace(preset, size, components):
            for (op, shape), calls in sorted(recorder.calls.items()):
                example = recorder.examples[op, shape]
                portable, cpu = _runner(op, example, PORTABLE), _runner(op, example, CPU)
                _time(portable), _time(cpu)  # compile and allocate first
                a, b = [], []
                for _ in range(repeats):
                    a.append(_time(portable))
                    b.append(_time(cpu))
                p_ms, c_ms = statistics.median(a), statistics.median(b)
                chosen = CPU.conv_formulation(example[0], mx.zeros(example[1])) if op == "conv2d" else "cpu"
                rows.append({"size": size, "model": component, "op": op, "shape": shape, "calls": calls,
                             "portable_ms": p_ms, "cpu_ms": c_ms, "cpu_formulation": chosen})
                print(f"{size} {component:4s} {op:16s} {shape:40s} ×{calls:<3d} portable {p_ms:8.2f} ms  "
                      f"cpu {c_ms:8.2f} ms  ({p_ms / c_ms:4.2f}×) {chosen}", flush=True)
    return rows


def markdown(rows: list[dict], machine: str) -> str:
    lines = [f"Per-op CPU rewrite vs MLX built-in ({machine}); median of interleaved runs, ms per call.", "",
             "| size | model | op | shape | calls/frame | portable ms | cpu ms | built-in ÷ rewrite | cpu path |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['model']} | {r['op']} | {r['shape']} | {r['calls']} | "
                     f"{r['portable_ms']:.2f} | {r['cpu_ms']:.2f} | {r['portable_ms'] / r['cpu_ms']:.2f} | "
                     f"{r['cpu_formulation']} |")
    for size in sorted({r["size"] for r in rows}):
        part = [r for r in rows if r["size"] == size]
        portable = sum(r["portable_ms"] * r["calls"] for r in part)
        cpu = sum(r["cpu_ms"] * r["calls"] for r in part)
        lines.append(f"\n{size}: these ops take {portable:.0f} ms per frame with portable ops, {cpu:.0f} ms with the "
                     f"CPU set ({portable / cpu:.2f}×).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=presets.DEFAULT)
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="unet,vae", help="which of unet, vae to trace")
    parser.add_argument("--out", type=Path, default=RUNS)
    args = parser.parse_args(argv)
    runtime.reserve_cpu_buffer_cache()  # as every model loaded on the CPU gets it
    rows = measure(args.preset, [int(s) for s in args.sizes.split(",")], args.repeats, tuple(args.models.split(",")))
    info = mx.device_info()
    table = markdown(rows, f"{args.preset}; {info.get('device_name')} {info.get('architecture')}, MLX {mx.__version__}")
    path = run_stem(args.out, "kernels").with_suffix(".md")
    path.write_text(table)
    print(table)
    print(f"bench: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
