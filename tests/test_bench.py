"""`bench/run.py` end to end on the tiny preset: the report it writes, and its reference-backend choice.

Speed is not asserted here (the bench measures it side by side); this checks that a run produces
complete, consistent numbers. Runtime ~15 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path: Path, backends: str, preset: str = "tiny") -> dict:
    env = {**os.environ, "MLX_SDXS_WEIGHTS": str(tmp_path / "weights")}
    out = tmp_path / "out"
    command = [sys.executable, "-m", "bench.run", "--backends", backends, "--sizes", "64", "--preset", preset,
               "--frames", "2", "--warmup", "1", "--loop-frames", "2", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (report,) = out.glob("bench-*.json")
    assert report.with_suffix(".md").is_file() and report.with_suffix(".png").is_file()
    assert report.with_name(report.stem + "-fps.png").is_file()
    assert "nan" not in report.with_suffix(".md").read_text().lower()
    return json.loads(report.read_text())


def test_bench_reports_every_stage_and_the_loop(tmp_path):
    report = _bench(tmp_path, "mlx,torch")
    results = report["sizes"]["64"]
    assert set(results) == {"mlx", "torch"}
    for name, entry in results.items():
        stages = entry["stages_ms"]
        assert set(stages) == {"preprocess", "encode", "unet", "decode", "postprocess"}
        for stage in stages.values():
            assert 0 < stage["min"] <= stage["median"] <= stage["p90"]
        total = sum(stages[s]["median"] for s in ("encode", "unet", "decode"))
        assert entry["encode_unet_decode_ms"] == pytest.approx(total)
        assert 0 < entry["encode_unet_decode_best_ms"] <= total * 1.5
        assert entry["loop"]["inferred"] >= 2 and entry["loop_fps"] > 0
        assert entry["unet_gflop"] > 0
    assert results["mlx"]["time_vs_mlx"] == 1.0
    assert report["system"]["mlx_blas"] and report["system"]["dtype"] and report["system"]["kernels"]
    assert report["system"]["kernels"] in results["mlx"]["backend"]  # e.g. "mlx-cpu (float32, cpu kernels)"
    primitives = report["primitives"]["64"]
    assert primitives["kernels"] in results["mlx"]["backend"] and primitives["frame"] > 0
    assert "Convolution" in primitives["top"] or any("Conv2d" in kind for kind in primitives["top"])


def test_bench_without_mlx_compares_against_the_first_backend_that_ran(tmp_path):
    results = _bench(tmp_path, "onnx,torch")["sizes"]["64"]
    assert "skipped" in results["onnx"]  # ONNX export refuses a 64-pixel render size, with the reason
    assert results["torch"]["time_vs_mlx"] == 1.0
    table = next((tmp_path / "out").glob("bench-*.md")).read_text()
    assert "| 64 | onnx | —" in table and "- onnx @ 64: ConfigError: render size sides must be" in table


def test_a_controlnet_preset_puts_each_backends_controlnet_frame_beside_its_plain_one(tmp_path):
    report = _bench(tmp_path, "mlx,torch", preset="tiny-sketch")
    results = report["sizes"]["64"]
    assert set(results) == {"mlx", "mlx+controlnet", "torch", "torch+controlnet"}
    assert results["mlx"]["time_vs_mlx"] == results["mlx+controlnet"]["time_vs_mlx"] == 1.0  # each against its own MLX
    for name in ("mlx", "torch"):
        assert results[name + "+controlnet"]["unet_gflop"] > results[name]["unet_gflop"]  # ControlNet + UNet
        assert results[name + "+controlnet"]["loop"]["inferred"] >= 2
    assert report["primitives"]["64+controlnet"]["frame"] > report["primitives"]["64"]["frame"]
    table = next((tmp_path / "out").glob("bench-*.md")).read_text()
    assert "- mlx+controlnet @ 64: " in table and "- torch+controlnet @ 64: " in table


def test_bench_refuses_an_images_folder_without_images(tmp_path):
    env = {**os.environ, "MLX_SDXS_WEIGHTS": str(tmp_path / "weights")}
    done = subprocess.run([sys.executable, "-m", "bench.run", "--images", str(tmp_path), "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"--images {tmp_path}: no readable .png/.jpg images" in done.stderr
    assert "Traceback" not in done.stderr


def test_streams_bench_measures_batched_streams_and_processes(tmp_path):
    """`bench.streams` on random-tiny at 64², 1 and 2 streams for 2 s: every cell of both modes has its figures,
    consistent with each other (~25 s on 2 cores)."""
    env = {**os.environ, "MLX_SDXS_WEIGHTS": str(tmp_path / "weights")}
    out = tmp_path / "out"
    command = [sys.executable, "-m", "bench.streams", "--model", "random-tiny", "--sizes", "64", "--streams", "1,2",
               "--seconds", "2", "--settle", "0.5", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("streams-*.json")  # streams-<device>-<time>
    report = json.loads(path.read_text())
    cells = report["sizes"]["64"]["mlx"]
    assert set(cells) == {"1", "2"}
    for count, modes in cells.items():
        assert set(modes) == {"batched", "processes"}
        for mode, cell in modes.items():
            assert len(cell["results"]) == int(count) and min(cell["results"]) >= 1, (count, mode)
            assert cell["aggregate_fps"] == pytest.approx(cell["stream_fps"] * int(count))
            assert 0 < cell["stream_fps_min"] <= cell["stream_fps"]
            assert 0 < cell["p50_ms"] <= cell["p90_ms"]
            assert cell["vs_one_stream"] == pytest.approx(cell["aggregate_fps"] / cells["1"][mode]["aggregate_fps"])
    assert cells["2"]["processes"]["threads_per_process"] == max(1, os.cpu_count() // 2)  # its share of the cores
    table = path.with_suffix(".md").read_text()
    assert table.startswith("Device: ") and "| 64 | mlx | 2 | processes |" in table and "nan" not in table.lower()
    assert path.with_suffix(".png").is_file()
