"""Many camera streams on one device: batched in one process against as many independent processes.

    python -m bench.streams [--streams 1,2,4,8] [--sizes 256,512] [--backends mlx,torch] [--seconds 30]
                            [--model random|random-tiny|DIFFUSERS_DIR]

For each render size, backend and stream count N, two modes, every stream a real camera loop (`run_loop`:
capture, inference, and a display that draws nothing) fed by its own moving scene at the camera rate (the
synthetic scene with its own random seed, rendered beforehand and replayed at 30 FPS, so that no stream pays
for drawing it, as a camera's driver costs next to nothing) and its own prompt:
- batched: the N streams in one process on one `StreamBatcher` — one model, one thread running the frames the
  streams have handed in as one batched step — every batch size up to N warmed up first; it has every core;
- processes: N processes, each its own model and one camera loop on it (the SDXS paper's "parallel
  inference"), each with its fair share of the cores: OpenBLAS and OpenMP (MLX's BLAS and the native CPU
  kernels, torch) get max(1, cores // N) threads.
Both run in worker processes of this module (`--worker`), so that the bench itself holds no model.
The streams of a run start together once all are warm; each stream's results are counted over the same window
(`--seconds`, after `--settle`), the capture→output latency of each result from its loop's `LoopStats`. The
machine's other load over the window (CPU busy time not spent by the run) is reported beside each cell.

Writes `streams-<device>-<time>.json|md|png` to --out: per size, backend, N and mode `aggregate_fps` (the sum
of the streams' AI FPS), `stream_fps` (mean) and `stream_fps_min`, `p50_ms`, `p90_ms`, and the ratio of the
aggregate to the same mode's at one stream.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.report import RUNS, write_results

ROOT = Path(__file__).resolve().parents[1]
MODES = ("batched", "processes")
#: Frames of each stream's scene, replayed in a loop (2 s at the camera rate: a moving scene throughout).
SCENE_FRAMES = 60
#: How long a stream waits for the others to be ready, and a worker process for its model and warm-up.
READY_S = 900.0
#: The thread pool sizes a worker process is given (MLX's BLAS is OpenBLAS; the native kernels, oneDNN and torch
#: use OpenMP).
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,2,4,8", help="stream counts, comma-separated")
    parser.add_argument("--sizes", default="256", help="render sizes, comma-separated (multiples of 64)")
    parser.add_argument("--backends", default="mlx",
                        help="comma-separated: mlx, torch, torch-graph (the frame as a CUDA graph; CUDA only)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: batched, processes")
    parser.add_argument("--model", default="random",
                        help="random (SDXS-512-0.9's shape), random-tiny, another random-* model, or a diffusers "
                             "checkpoint folder")
    parser.add_argument("--seconds", type=float, default=30.0, help="the measured window of each run")
    parser.add_argument("--rounds", type=int, default=1,
                        help="sweeps of every cell, one after another (each cell's figures: the median over them; "
                             "a shared machine's slow spells then hit every cell alike)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds after the streams start before the window opens (they fall into step)")
    parser.add_argument("--dtype", default="auto", help="MLX dtype (auto: float16 on a GPU, float32 on the CPU)")
    parser.add_argument("--kernels", default=None, help="MLX kernel policy (default $MLX_SDXS_KERNELS or auto)")
    parser.add_argument("--device", default=None, help="torch device (default cpu; cuda for torch-graph)")
    parser.add_argument("--torch-dtype", default="auto", help="torch dtype (auto: float32 on cpu, float16 on cuda)")
    parser.add_argument("--out", type=Path, default=RUNS)
    parser.add_argument("--keep-openblas-env", action="store_true", help="do not unset OPENBLAS_CORETYPE/L2_SIZE")
    parser.add_argument("--worker", choices=("batched", "alone"), default=None, help=argparse.SUPPRESS)  # a run's
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)  # an alone worker's stream
    args = parser.parse_args(argv)
    try:
        args.stream_counts = sorted({int(n) for n in args.streams.split(",")})
        args.size_list = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--streams {args.streams!r} and --sizes {args.sizes!r} must be comma-separated integers")
    if min(args.stream_counts) < 1:
        parser.error("--streams: every count must be at least 1")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.mode_list or set(args.mode_list) - set(MODES):
        parser.error(f"--modes must name some of {', '.join(MODES)}, not {args.modes!r}")
    if args.seconds <= 0 or args.settle < 0 or args.rounds < 1:
        parser.error("--seconds must be positive, --settle not negative and --rounds at least 1")
    _model(args, parser)
    return args


def _model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """`--model` as the bench harness's preset and checkpoint (`inputs.prepare_checkpoint`)."""
    from mlx_sdxs import presets

    if args.model in presets.RANDOM_MODELS:
        args.preset, args.checkpoint = presets.RANDOM_MODELS[args.model], None
    elif Path(args.model).is_dir():
        args.preset, args.checkpoint = presets.DEFAULT, Path(args.model)
    else:
        parser.error(f"--model {args.model!r}: neither a random model ({', '.join(presets.RANDOM_MODELS)}) "
                     "nor a diffusers checkpoint folder")


# --- one stream ------------------------------------------------------------------------------------
def prompt_of(index: int) -> str:
    from bench.inputs import PROMPT

    return f"{PROMPT}, stream {index + 1}"


def scene(index: int):
    """Stream `index`'s camera: its own synthetic scene at the camera rate, rendered once and replayed."""
    from bench.inputs import ReplaySource
    from mlx_sdxs.camera.sources import DEFAULT_FPS, DEFAULT_SIZE, SyntheticSource

    source = SyntheticSource(*DEFAULT_SIZE, DEFAULT_FPS, seed=index)
    return ReplaySource([source.render(k) for k in range(SCENE_FRAMES)], DEFAULT_FPS)


class ResultTimes:
    """The display stage of a measured stream: draws nothing (so it is called once per AI result) and notes
    when each result arrived; the loop's `LoopStats` appends each one's latency in the same order."""

    draws = False

    def __init__(self) -> None:
        self.arrivals: list[float] = []

    def present(self, tick, control) -> None:
        self.arrivals.append(time.perf_counter())

    def idle(self, control) -> None:
        pass


def run_stream(backend, index: int, args: argparse.Namespace, on_ready, warmup: bool) -> dict:
    """One camera loop on `backend` until the window closes; `on_ready()` (returning the start time) is called
    once the loop is warm, before its camera starts. Its AI FPS and latencies over the window."""
    from mlx_sdxs.camera.loop import run_loop
    from mlx_sdxs.camera.state import LoopControl

    control = LoopControl()
    # Every frame is inferred: the similarity gate would only skip frames of a still scene, and this one moves.
    control.request(prompt=prompt_of(index), similarity_threshold=0.0)
    times = ResultTimes()
    started: list[float] = []
    source = scene(index)
    stats = run_loop(source, backend, times, control=control, warmup=warmup, duration=args.settle + args.seconds,
                     on_ready=lambda _: started.append(on_ready()))
    if not started:
        raise RuntimeError(f"stream {index + 1} stopped before it started ({stats.stop_reason})")
    opens = started[0] + args.settle
    inside = [(at, latency) for at, latency in zip(times.arrivals, stats.latencies_s)
              if opens <= at <= opens + args.seconds]
    arrivals = [at for at, _ in inside]
    # From the first to the last result in the window: results come one batch at a time, and counting them in a
    # fixed window would be off by up to a batch.
    fps = ((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 and arrivals[-1] > arrivals[0]
           else len(arrivals) / args.seconds)
    return {"fps": fps, "results": len(arrivals), "latencies_ms": [1000 * latency for _, latency in inside]}


# --- the runs: every one in worker processes of this module, so that the bench itself holds no model ----------
def busy_seconds() -> float:
    """CPU seconds this machine has spent busy (every core, every process) since it started."""
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def worker_command(name: str, size: int, kind: str, count: int, index: int, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "bench.streams", "--worker", kind, "--streams", str(count), "--index", str(index),
               "--backends", name, "--sizes", str(size), "--model", args.model, "--seconds", str(args.seconds),
               "--settle", str(args.settle), "--dtype", args.dtype, "--torch-dtype", args.torch_dtype,
               "--keep-openblas-env"]
    for flag, value in (("--kernels", args.kernels), ("--device", args.device)):
        if value is not None:
            command += [flag, value]
    return command


def run_cell(name: str, size: int, count: int, mode: str, args: argparse.Namespace) -> dict:
    """`count` streams one way: one worker batching them all, or `count` workers of one stream each with their
    share of the cores. Every worker gets ready (model loaded, warm), then all start at once."""
    if mode == "batched":
        commands, env, threads = [worker_command(name, size, "batched", count, 0, args)], dict(os.environ), None
    else:
        threads = max(1, (os.cpu_count() or 1) // count)
        commands = [worker_command(name, size, "alone", 1, index, args) for index in range(count)]
        env = {**os.environ, **{variable: str(threads) for variable in THREAD_VARIABLES}}
    workers: list[subprocess.Popen] = []
    try:
        for command in commands:
            workers.append(subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE))
        for index, worker in enumerate(workers):
            said = ""
            for said in worker.stdout:
                if said.strip() == "ready":
                    break
            else:
                if worker.wait() == 0 and said.startswith("{"):
                    return json.loads(said)  # the backend cannot run here: {"skipped": why}
                raise SystemExit(f"bench.streams: worker {index + 1} of {len(workers)} did not get ready "
                                 f"(exit status {worker.returncode}; its error is above)")
        window = {"go": time.perf_counter(), "busy": busy_seconds()}
        for worker in workers:
            worker.stdin.write("go\n")
            worker.stdin.flush()
        outputs = [worker.communicate(timeout=READY_S)[0] for worker in workers]
        ended = {"busy": busy_seconds(), "at": time.perf_counter()}
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    failed = [index + 1 for index, worker in enumerate(workers) if worker.returncode != 0]
    if failed:
        raise SystemExit(f"bench.streams: workers {failed} of {len(workers)} failed (their errors are above)")
    reports = [json.loads(output.strip().splitlines()[-1]) for output in outputs]
    streams = [stream for report in reports for stream in report["streams"]]
    return summarise(streams, threads or reports[0]["threads"], window, ended, sum(r["cpu_s"] for r in reports))


def worker(args: argparse.Namespace) -> int:
    """A worker: `batched`, `--streams` camera loops on one `StreamBatcher`; `alone`, one camera loop (stream
    `--index`) on its own model. Says "ready" once every stream is warm, waits for "go", runs, and prints its
    streams' figures as one JSON line (or `{"skipped": why}` when the backend cannot run here)."""
    from bench.inputs import prepare_checkpoint
    from bench.measure import make_backend
    from mlx_sdxs import runtime
    from mlx_sdxs.backends import compute_threads

    runtime.select_kernels(args.kernels)
    recipe = make_backend(args.backends, args.size_list[0], *prepare_checkpoint(args.preset, args.checkpoint), args)
    if isinstance(recipe, str):
        print(json.dumps({"skipped": recipe}), flush=True)
        return 0
    threads = compute_threads(recipe)
    start: dict[str, float] = {}

    def go() -> float:  # once every stream is warm, before any camera starts
        if not start:
            print("ready", flush=True)
            if sys.stdin.readline().strip() != "go":
                raise SystemExit("bench.streams: the bench went away before the streams started")
            start.update(at=time.perf_counter(), cpu=time.process_time())
        return start["at"]

    if args.worker == "batched":
        streams = run_batched(recipe, args.stream_counts[0], args, go)
    else:
        try:
            streams = [run_stream(recipe, args.index, args, go, warmup=True)]
        finally:
            recipe.close()
    print(json.dumps({"streams": streams, "cpu_s": time.process_time() - start["cpu"], "threads": threads}),
          flush=True)
    return 0


def run_batched(recipe, count: int, args: argparse.Namespace, go) -> list[dict]:
    """`count` camera loops in this process, their streams batched by one `StreamBatcher` on `recipe`'s engine;
    `go()` is run once, when every stream is warm and waits for its camera."""
    from dataclasses import replace

    from mlx_sdxs.backends.batcher import StreamBatcher

    batcher = StreamBatcher(recipe, streams=count)
    batcher.start()
    streams = [batcher.host]
    barrier = threading.Barrier(count, action=go)
    results: list[dict] = [{}] * count
    errors: list[BaseException] = []

    def stream(index: int) -> None:
        def ready() -> float:
            barrier.wait(READY_S)
            return go()  # the start time, set when the barrier let everyone through
        try:
            results[index] = run_stream(streams[index], index, args, ready, warmup=False)
        except BaseException as error:  # noqa: BLE001 — re-raised on the calling thread
            errors.append(error)
            barrier.abort()  # no stream waits for one that failed

    try:
        batcher.warm()  # each batch size up to `count` streams, before the others join
        host = batcher.host.stream.settings
        streams += [batcher.open(replace(host, seed=host.seed + i)) for i in range(1, count)]
        workers = [threading.Thread(target=stream, args=(i,), name=f"bench-stream-{i + 1}", daemon=True)
                   for i in range(count)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
    finally:
        barrier.abort()  # on Ctrl-C during the warm-up, no stream waits for the others
        for handle in reversed(streams):  # the host's last: it closes the batcher, the engine with it
            handle.close()
    if errors:
        raise errors[0]
    return results


def summarise(streams: list[dict], threads: int, window: dict, ended: dict, cpu_s: float) -> dict:
    """A cell of the table from its streams' figures; the run's own CPU use and the machine's other load."""
    from bench.measure import percentile

    fps = [s["fps"] for s in streams]
    latencies = [ms for s in streams for ms in s["latencies_ms"]]
    elapsed = ended["at"] - window["go"]
    cores = cpu_s / elapsed
    return {
        "aggregate_fps": sum(fps), "stream_fps": statistics.fmean(fps), "stream_fps_min": min(fps),
        "p50_ms": percentile(latencies, 50), "p90_ms": percentile(latencies, 90),
        "stream_p50_ms_max": max((percentile(s["latencies_ms"], 50) or 0.0) for s in streams),
        "results": [s["results"] for s in streams], "threads_per_process": threads,
        "cores_used": cores, "other_load_cores": max(0.0, (ended["busy"] - window["busy"] - cpu_s) / elapsed),
        # Results per CPU second the run got: on a shared host, less swayed by the neighbours than FPS itself.
        "fps_per_core": sum(fps) / cores,
    }


def combine(entries: list[dict]) -> dict:
    """A cell from its rounds: each figure's median over them, each stream's results counted over all of them
    (every round kept under `rounds`)."""
    if any("skipped" in entry for entry in entries):
        return next(entry for entry in entries if "skipped" in entry)
    cell = {key: statistics.median(entry[key] for entry in entries) if isinstance(value, float) else value
            for key, value in entries[0].items() if isinstance(value, (int, float))}  # ints are settings: alike
    results = [sum(counts) for counts in zip(*(entry["results"] for entry in entries))]
    return {**cell, "results": results, "rounds": entries}


# --- report --------------------------------------------------------------------------------------------
COLUMNS = ("size", "backend", "streams", "mode", "aggregate FPS", "× 1 stream", "stream FPS mean", "stream FPS min",
           "p50 ms", "p90 ms", "threads / process", "cores used", "FPS per core", "other load (cores)")


def markdown(report: dict) -> str:
    from bench.report import DASH, cell, device_line

    settings = report["settings"]
    lines = [device_line(report["system"]) + ".",
             f"Model {settings['model']}; each stream a camera loop on its own synthetic scene at "
             f"{settings['camera_fps']:g} FPS ({settings['camera_size']}); window {settings['seconds']:g} s after "
             f"{settings['settle']:g} s, each cell the median of {settings['rounds']} round(s); load average "
             f"{settings['load_before']} before the run.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    notes = []
    for size, backends in report["sizes"].items():
        for backend, counts in backends.items():
            for count, modes in counts.items():
                for mode, e in modes.items():
                    if "skipped" in e:
                        notes.append(f"- {backend} {mode} @ {size}, {count} stream{'s' * (count != '1')}: "
                                     f"{e['skipped']}")
                        lines.append(f"| {size} | {backend} | {count} | {mode} | "
                                     + " | ".join([DASH] * (len(COLUMNS) - 4)) + " |")
                        continue
                    ratio = DASH if e.get("vs_one_stream") is None else f"{e['vs_one_stream']:.2f}"
                    lines.append(f"| {size} | {backend} | {count} | {mode} | {e['aggregate_fps']:.2f} | {ratio} | "
                                 f"{e['stream_fps']:.2f} | {e['stream_fps_min']:.2f} | {cell(e['p50_ms'], 0)} | "
                                 f"{cell(e['p90_ms'], 0)} | {e['threads_per_process']} | {e['cores_used']:.2f} | "
                                 f"{e['fps_per_core']:.2f} | {e['other_load_cores']:.2f} |")
    lines += ["", "`× 1 stream`: aggregate FPS over the same mode's with one stream. `cores used`: the run's CPU "
                  "time over the window (all its processes); `FPS per core`: aggregate FPS over it. `other load`: the "
                  "machine's busy cores over the window not spent by the run (other users)."]
    if notes:
        lines += ["", "Not run:", *notes]
    return "\n".join(lines) + "\n"


def measure(args: argparse.Namespace) -> dict:
    from bench.inputs import prepare_checkpoint
    from bench.system import system_info
    from mlx_sdxs.camera.sources import DEFAULT_FPS, DEFAULT_SIZE

    prepare_checkpoint(args.preset, args.checkpoint)  # once, before the workers load it
    report = {"system": system_info(args, f"the synthetic scene, {SCENE_FRAMES} frames per stream replayed"),
              "settings": {"model": args.model, "seconds": args.seconds, "settle": args.settle, "rounds": args.rounds,
                           "camera_fps": DEFAULT_FPS, "camera_size": "x".join(map(str, DEFAULT_SIZE)),
                           "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg())},
              "sizes": {}}
    backends = [n.strip() for n in args.backends.split(",") if n.strip()]
    runs: dict[tuple, list[dict]] = {}
    skipped: dict[str, str] = {}  # a backend that cannot load here is tried once
    for turn in range(args.rounds):
        for size in args.size_list:
            for name in backends:
                for count in args.stream_counts:
                    for mode in args.mode_list:
                        if name in skipped:
                            entry = {"skipped": skipped[name]}
                        else:
                            load = os.getloadavg()[0]
                            entry = run_cell(name, size, count, mode, args)
                            entry["load_average_before"] = round(load, 2)
                            if "skipped" in entry:
                                skipped[name] = entry["skipped"]
                        runs.setdefault((str(size), name, str(count), mode), []).append(entry)
                        print(f"bench.streams: round {turn + 1}/{args.rounds}, {name} @ {size}, {count} {mode}: "
                              + json.dumps({k: v for k, v in entry.items() if k != "results"}), flush=True)
    for (size, name, count, mode), entries in runs.items():
        cells = report["sizes"].setdefault(size, {}).setdefault(name, {})
        cells.setdefault(count, {})[mode] = combine(entries)
    for cells in (cells for backends in report["sizes"].values() for cells in backends.values()):
        for count, modes in cells.items():
            for mode, entry in modes.items():
                one = cells.get("1", {}).get(mode, {})
                if "aggregate_fps" in entry and "aggregate_fps" in one:
                    entry["vs_one_stream"] = entry["aggregate_fps"] / one["aggregate_fps"]
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.keep_openblas_env:
        from bench.run import reexec_without_openblas_overrides

        reexec_without_openblas_overrides("bench.streams")
    import mlx_sdxs  # noqa: F401  (fast BLAS before mlx.core)
    from mlx_sdxs import runtime
    from mlx_sdxs.camera.app import stop_on_sigterm
    from mlx_sdxs.errors import SDXSError

    if args.worker is not None:
        return worker(args)
    runtime.select_kernels(args.kernels)
    with stop_on_sigterm():
        try:
            report = measure(args)
        except KeyboardInterrupt:
            print("bench.streams: stopped; nothing written", file=sys.stderr)
            return 130
        except SDXSError as error:
            print(f"bench.streams: error: {error}", file=sys.stderr)
            return 1
    from bench.charts import write_streams_chart
    from bench.system import device_tag

    write_results(args.out, f"streams-{device_tag(report['system'])}", report, markdown(report), write_streams_chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
