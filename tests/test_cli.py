"""Every `mlx-sdxs` command end to end on the random-weight model (no Hub, no torch at run time)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from mlx_sdxs import runtime
from mlx_sdxs.cli import main
from fake_backend import count_video_frames
from oracle import expected_ops

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed entry point's code in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "mlx_sdxs.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_txt2img_random_model_is_labelled(tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["txt2img", "--prompt", "a red fox", "--model", "random-tiny", "--size", "64", "-o", str(out)]) == 0
    image = cv2.imread(str(out))
    assert image.shape == (64, 64, 3)
    assert "RANDOM WEIGHTS" in capsys.readouterr().err
    # The banner is drawn on the image itself: its strip differs from the unlabelled output.
    from mlx_sdxs.pipeline import SDXSPipeline

    plain = SDXSPipeline.random("random-tiny").txt2img("a red fox", size=64)
    assert not np.array_equal(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), plain)
    assert not list(tmp_path.glob("*.partial"))
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()  # like any file the user writes, not a temp's 0600


def test_img2img_reads_odd_inputs(tmp_path):
    grey16 = (np.arange(50 * 70, dtype=np.uint16).reshape(50, 70) * 13)
    source = tmp_path / "grey16.png"
    cv2.imwrite(str(source), grey16)
    out = tmp_path / "out.png"
    assert main(["img2img", str(source), "--prompt", "ink", "--model", "random-tiny", "--size", "64",
                 "-o", str(out)]) == 0
    assert cv2.imread(str(out)).shape == (64, 64, 3)


def test_convert_then_run_the_converted_folder(tmp_path):
    pytest.importorskip("torch")
    from checkpoints import build_checkpoint

    source = build_checkpoint(tmp_path / "ckpt")
    dst = tmp_path / "weights" / "tiny"
    assert main(["convert", str(source), "-o", str(dst)]) == 0
    assert dst.stat().st_mode & 0o777 == 0o777 & ~_umask()  # readable by others, not a temp folder's 0700
    out = tmp_path / "t.png"
    assert main(["txt2img", "--prompt", "x", "--model", str(dst), "--size", "64", "-o", str(out)]) == 0
    assert out.is_file()
    assert main(["info", "--weights-dir", str(tmp_path / "weights")]) == 0


def test_download_offline_with_empty_cache_is_one_clear_line(tmp_path):
    result = run_cli("download", "IDKiro/sdxs-512-0.9", "--weights-dir", str(tmp_path / "w"),
                     env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf")})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "IDKiro/sdxs-512-0.9" in result.stderr and "--model" in result.stderr


def test_info_names_device_dtype_and_kernel_policy():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    assert "device:" in result.stdout and "default dtype" in result.stdout
    assert f"kernels: {expected_ops(runtime.default_dtype())} (policy " in result.stdout
    assert "kernels: portable (policy portable" in run_cli("info", "--kernels", "portable").stdout
    assert "kernels: portable (policy portable" in run_cli("info", env={"MLX_SDXS_KERNELS": "portable"}).stdout
    bad = run_cli("info", env={"MLX_SDXS_KERNELS": "fast"})
    assert bad.returncode == 1 and "MLX_SDXS_KERNELS='fast' is not a kernel policy" in bad.stderr
    if runtime.on_gpu():
        pytest.skip("BLAS and CPU-kernel lines are printed on the CPU only")
    assert "BLAS:" in result.stdout and "native CPU kernels:" in result.stdout
    assert "fused CPU kernels: compiled with" in result.stdout or "fused CPU kernels: uncompiled" in result.stdout


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["img2img", "x.png", "--prompt", "p", "--strength", "2"], "--strength must be in [0.02, 1.0]"),
        (["txt2img", "--prompt", "p", "--size", "100"], "multiples of 64"),
        (["txt2img", "--prompt", "p", "--size", "512x100"], "multiples of 64"),
        (["txt2img", "--prompt", "p", "--kernels", "gpu"], "invalid choice: 'gpu'"),
        (["camera", "--render-size", "7"], "--render-size must be"),
        (["txt2img", "--prompt", "p", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_argument_errors_name_the_flag_and_range(argv, expected, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert expected in capsys.readouterr().err


def _video(path) -> tuple[int, tuple[int, int]]:
    capture = cv2.VideoCapture(str(path))
    frames, shape = 0, None
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames, shape = frames + 1, frame.shape[:2]
    capture.release()
    return frames, shape


@pytest.mark.timeout(120)
def test_camera_headless_records_synthetic_source(tmp_path):
    video = tmp_path / "session.mp4"
    result = run_cli("camera", "--model", "random-tiny", "--source", "synthetic", "--headless", "--render-size", "128",
                     "--output-size", "64", "--max-frames", "6", "--record", str(video), "--record-every-frame",
                     "--similarity-threshold", "0")
    assert result.returncode == 0, result.stderr
    assert "RANDOM WEIGHTS" in result.stderr
    assert "AI " in result.stdout and "display " in result.stdout
    assert _video(video) == (6, (128, 128))  # the AI view, at the render size


@pytest.mark.timeout(180)
def test_camera_512x384_records_a_512x384_mp4(tmp_path):
    """Any aspect end to end: a 4:3 render size, crop to the aspect, latents of that shape, the recording."""
    video = tmp_path / "wide.mp4"
    result = run_cli("camera", "--model", "random-tiny", "--source", "synthetic", "--headless",
                     "--render-size", "512x384", "--max-frames", "4", "--record", str(video), "--record-every-frame",
                     "--similarity-threshold", "0", "--capture-size", "320x240")
    assert result.returncode == 0, result.stderr
    assert "at 512x384" in result.stderr
    assert _video(video) == (4, (384, 512))
    whole = tmp_path / "window.mp4"
    result = run_cli("camera", "--model", "random-tiny", "--source", "synthetic", "--headless", "--render-size",
                     "512x384", "--max-frames", "2", "--record", str(whole), "--record-every-frame",
                     "--record-view", "display", "--output-size", "192")
    assert result.returncode == 0, result.stderr
    assert _video(whole) == (2, (192, 512))  # camera | AI, each 256×192


@pytest.mark.parametrize("backend", ["mlx", *(pytest.param(name, marks=pytest.mark.policy_independent)
                                              for name in ("torch", "onnx", "coreml"))])
@pytest.mark.timeout(600)
def test_every_backend_without_model_starts_or_explains_itself(backend, tmp_path):
    """No --model: the default model, which offline and uncached falls back to labelled random weights."""
    if backend != "mlx":
        pytest.importorskip("torch", reason="the comparison backends need the reference extra")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf"), "MLX_SDXS_WEIGHTS": str(tmp_path / "w")}
    result = run_cli("camera", "--backend", backend, "--source", "synthetic", "--headless", "--render-size", "256",
                     "--max-frames", "1", "--similarity-threshold", "0", env=env, timeout=580)
    assert "Traceback" not in result.stderr
    if backend == "coreml" and sys.platform != "darwin":
        assert result.returncode == 1 and "CoreML prediction only exists on macOS" in result.stderr
        return
    assert result.returncode == 0, result.stderr[-2000:]
    assert "RANDOM WEIGHTS" in result.stderr and "displayed 1" in result.stdout


@pytest.mark.parametrize("command", [["export", "coreml", "--help"], ["export", "onnx", "--help"], ["studio", "--help"],
                                     ["convert", "--help"]])
def test_installed_commands_have_help(command):
    """From the installed entry point: the exports and the studio ship in the package (no `convert` top-level)."""
    import shutil

    entry = shutil.which("mlx-sdxs", path=str(Path(sys.executable).parent)) or "mlx-sdxs"
    done = subprocess.run([entry, *command], capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    assert "usage: mlx-sdxs" in done.stdout


@pytest.mark.timeout(180)
def test_several_sources_run_as_streams_of_one_batch_each_recorded(tmp_path):
    """`camera --source A --source B`: two camera loops in one batch, a recording each (the second numbered), a
    summary each; the studio refuses a second --source (its visitors bring their own)."""
    video = tmp_path / "out.mp4"
    result = run_cli("camera", "--model", "random-tiny", "--source", "synthetic", "--source", "synthetic",
                     "--headless", "--render-size", "64", "--max-frames", "8", "--record", str(video),
                     "--record-every-frame")
    assert result.returncode == 0, result.stderr
    assert count_video_frames(video) == 8 and count_video_frames(tmp_path / "out-2.mp4") >= 1
    assert "stream 2 (synthetic):" in result.stdout and result.stdout.count("AI ") == 2
    refused = run_cli("studio", "--model", "random-tiny", "--source", "synthetic", "--source", "0", "--port", "0")
    assert refused.returncode == 1 and "the studio takes one --source" in refused.stderr
