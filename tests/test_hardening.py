"""Hardening matrix: every bad input gets a clear error, nothing is lost, nothing hangs.

One row per case. Each row arranges its inputs (not timed), then runs one action that must, within
`TIME_LIMIT_S`, either raise the exact error class, warn, return the CLI exit status (with exactly
one error line on stderr and no traceback), or succeed; the message must name the cause and the
file, key or flag; afterwards no `*.partial*`/`*.old-*` leftovers may remain under the row's folder.

The 10,000-frame soak test lives in test_camera_loop.py; the camera fakes come from
test_camera_sources.py and fake_backend.py.
"""

from __future__ import annotations

import errno
import io
import json
import pickle
import shutil
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import mlx.core as mx
import numpy as np
import pytest
from fake_backend import FakeBackend, count_video_frames, ctrl_c_after_frames, no_leaked_threads  # noqa: F401 (autouse fixture)
from test_camera_sources import CaptureFactory, FakeCapture

from mlx_sdxs import convert as C
from mlx_sdxs import imageio
from mlx_sdxs import weights as W
from mlx_sdxs.camera.loop import run_loop
from mlx_sdxs.camera.sources import CameraSource, SyntheticSource, open_source
from mlx_sdxs.cli import main
from mlx_sdxs.convert import convert_checkpoint
from mlx_sdxs.errors import ConfigError, ImageError, SourceError, WeightsError
from mlx_sdxs.imageio import read_image
from mlx_sdxs.pipeline import SDXSPipeline
from mlx_sdxs.presets import FOLDER as PRESETS
from mlx_sdxs.recipe import RecipeSettings

TIME_LIMIT_S = 2.0
TINY = ("--model", "random-tiny", "--size", "64")
CAMERA = ("camera", "--source", "synthetic", "--capture-size", "161x121", "--fps", "200", "--headless",
          "--render-size", "128", "--output-size", "64", "--model", "random-tiny")


_build_random = SDXSPipeline.random  # the real one: rows replace SDXSPipeline.random with the shared pipeline


# --- shared, untimed fixtures -------------------------------------------------------------------

class Assets:
    """Built once per module, on first use: the tiny random pipeline and a tiny checkpoint + its conversion."""

    def __init__(self, root: Path):
        self.root = root
        self._pipeline: SDXSPipeline | None = None

    @property
    def pipeline(self) -> SDXSPipeline:
        if self._pipeline is None:
            self._pipeline = _build_random("random-tiny")
            # First-use kernel compilation (seconds per new kernel on a GPU) is not what rows time.
            self._pipeline.txt2img("warm-up", size=64)
            self._pipeline.img2img(np.zeros((64, 64, 3), np.uint8), "warm-up", size=64)
            self._pipeline.stream(RecipeSettings(render_size=128), "warm-up").warmup()
        return self._pipeline

    @property
    def checkpoint(self) -> Path:
        path = self.root / "checkpoint"
        if not path.is_dir():
            pytest.importorskip("torch")
            from checkpoints import build_checkpoint
            from tqdm import tqdm

            # diffusers' save progress bar would otherwise start tqdm's monitor thread (a "leaked" thread).
            interval, tqdm.monitor_interval = tqdm.monitor_interval, 0
            try:
                build_checkpoint(path)
            finally:
                tqdm.monitor_interval = interval
        return path

    @property
    def converted(self) -> Path:
        path = self.root / "converted"
        if not path.is_dir():
            convert_checkpoint(self.checkpoint, path)
        return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    return Assets(tmp_path_factory.mktemp("hardening-assets"))


@dataclass
class Env:
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    assets: Assets
    #: What a row's arrange step keeps for its `then` check.
    log: io.StringIO | None = None
    factory: CaptureFactory | None = None
    backend: FakeBackend | None = None

    def converted(self) -> Path:
        """A private copy of the converted tiny model at `tmp/model`."""
        return Path(shutil.copytree(self.assets.converted, self.tmp / "model"))

    def checkpoint(self) -> Path:
        """A private copy of the tiny diffusers checkpoint at `tmp/ckpt`."""
        return Path(shutil.copytree(self.assets.checkpoint, self.tmp / "ckpt"))


@pytest.fixture
def env(tmp_path, monkeypatch, assets) -> Env:
    # `--model random-tiny` gets the module's (warmed-up) random pipeline instead of building one per row.
    monkeypatch.setattr(SDXSPipeline, "random", classmethod(lambda cls, *args, **kwargs: assets.pipeline))
    return Env(tmp_path, monkeypatch, assets)


# --- helpers ------------------------------------------------------------------------------------

def cli(*argv: object) -> Callable[[], int]:
    """The action of running `mlx-sdxs ARGV` in-process; returns the exit status (argparse's included)."""

    def run() -> int:
        try:
            return main([str(a) for a in argv])
        except SystemExit as exit_:
            return exit_.code

    return run


def png_bytes(width: int, height: int, bit_depth: int = 8) -> bytes:
    """A valid all-black grayscale PNG written by hand, so any size (even 0×0 or > 8192²) costs nothing."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes((width * bit_depth + 7) // 8)  # filter byte + packed samples
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * height, 1))
            + chunk(b"IEND", b""))


def write(path: Path, data: bytes | np.ndarray) -> Path:
    if isinstance(data, np.ndarray):
        assert cv2.imwrite(str(path), data)
    else:
        path.write_bytes(data)
    return path


def edit_weights(folder: Path, edit: Callable[[dict, dict], None]) -> None:
    """Rewrite `folder/model.safetensors` after `edit(weights, metadata)` changed them in place."""
    path = folder / W.WEIGHTS_FILE
    weights, metadata = mx.load(str(path), return_metadata=True)
    edit(weights, metadata)
    mx.save_safetensors(str(path), weights, metadata=metadata)


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / W.CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def forbid(env: Env, owner: object, name: str) -> None:
    """Make `owner.name` fail the row if it is ever called."""

    def called(*args, **kwargs):
        raise AssertionError(f"{name} must not be called here")

    env.monkeypatch.setattr(owner, name, called)


def raise_on_call(env: Env, owner: object, name: str, error: BaseException, call: int = 1) -> None:
    """`owner.name` raises `error` on its `call`-th call and works normally before."""
    original, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error
        return original(*args, **kwargs)

    env.monkeypatch.setattr(owner, name, wrapper)


def short_video(path: Path) -> Path:
    """6 frames of distinct grey levels (0, 40, …, 200)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (96, 64))
    for value in range(0, 240, 40):
        writer.write(np.full((64, 96, 3), value, np.uint8))
    writer.release()
    return path


class _TouchOnUnpickle:
    """A pickle payload whose unpickling creates `path`: proof that a file was (or was not) unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def _output_is(path: Path, shape: tuple[int, ...]) -> Callable[[Env, Any], None]:
    def check(env: Env, result: Any) -> None:
        image = cv2.imread(str(env.tmp / path))
        assert image is not None and image.shape == shape

    return check


def _nothing_at(*names: str) -> Callable[[Env, Any], None]:
    def check(env: Env, result: Any) -> None:
        assert not [name for name in names if (env.tmp / name).exists()], "a failed run left output behind"

    return check


# --- the rows -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    id: str
    #: Builds the row's inputs under env.tmp (untimed) and returns the action to time.
    arrange: Callable[[Env], Callable[[], Any]]
    #: An exception class (raised), a Warning class (warned), an int (CLI exit status), or None (succeeds).
    expect: type[BaseException] | int | None
    #: Substrings the message must contain ("{tmp}" is the row's folder).
    says: tuple[str, ...] = ()
    #: Extra checks on the row's folder and the action's result.
    then: Callable[[Env, Any], None] | None = None


def _missing_component(env: Env):
    model = env.converted()
    shutil.rmtree(model / "unet")
    return cli("txt2img", "--prompt", "x", "--model", model, "--size", "64", "-o", env.tmp / "out.png")


def _truncated(env: Env):
    path = env.converted() / "vae" / W.WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return lambda: W.load_vae(env.tmp / "model" / "vae")


def _wrong_dtype(env: Env):
    unet = env.converted() / "unet"
    edit_weights(unet, lambda w, m: w.update({"conv_in.weight": w["conv_in.weight"].astype(mx.int32)}))
    return lambda: W.load_unet(unet)


def _wrong_shape(env: Env):
    unet = env.converted() / "unet"
    edit_weights(unet, lambda w, m: w.update({"conv_in.weight": w["conv_in.weight"][:, :, :, :3]}))
    return lambda: W.load_unet(unet)


def _missing_and_unexpected(env: Env):
    unet = env.converted() / "unet"

    def edit(weights, metadata):
        weights["conv_out.extra"] = weights.pop("conv_out.bias")

    edit_weights(unet, edit)
    return lambda: W.load_unet(unet)


def _pickle_only(env: Env):
    checkpoint = env.tmp / "ckpt"
    for component in ("unet", "vae", "text_encoder", "scheduler"):
        shutil.copytree(PRESETS / "tiny" / component, checkpoint / component)
    # A tokenizer that loads (conversion checks it first), so what is refused is the UNet's pickle.
    shutil.copytree(Path(__file__).parent / "fixtures" / "clip-tiny-tokenizer", checkpoint / "tokenizer")
    (checkpoint / "model_index.json").write_text("{}")
    probe = env.tmp / "probe"
    pickle.loads(pickle.dumps(_TouchOnUnpickle(probe)))
    assert probe.exists(), "the payload must be live, or the row proves nothing"
    (checkpoint / "unet" / "diffusion_pytorch_model.bin").write_bytes(
        pickle.dumps(_TouchOnUnpickle(env.tmp / "UNPICKLED")))
    return lambda: convert_checkpoint(checkpoint, env.tmp / "out")


def _config_change(component: str, **changes: Any):
    def arrange(env: Env):
        folder = env.converted() / component
        edit_config(folder, **changes)
        return lambda: W.load_component(folder, component)

    return arrange


def _format_version(version: str | None):
    def arrange(env: Env):
        vae = env.converted() / "vae"

        def edit(weights, metadata):
            if version is None:
                metadata.clear()
            else:
                metadata["format_version"] = version

        edit_weights(vae, edit)
        return lambda: W.load_vae(vae)

    return arrange


def _image(name: str, data: bytes | Callable[[], np.ndarray | bytes]):
    def arrange(env: Env):
        path = write(env.tmp / name, data() if callable(data) else data)
        return lambda: read_image(path)

    return arrange


def _refused_before_decoding(name: str, data: Callable[[], np.ndarray | bytes]):
    def arrange(env: Env):
        path = write(env.tmp / name, data())
        forbid(env, imageio.cv2, "imdecode")  # the header alone must settle it: no multi-GB decode
        return lambda: read_image(path)

    return arrange


def _img2img(width: int, height: int):
    def arrange(env: Env):
        source = write(env.tmp / "in.png", np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8))
        return cli("img2img", source, "--prompt", "ink", *TINY, "-o", env.tmp / "out.png")

    return arrange


def _shape_is(shape: tuple[int, ...]):
    def check(env: Env, image: np.ndarray) -> None:
        assert image.shape == shape and image.dtype == np.uint8

    return check


def _grey_is_replicated(env: Env, image: np.ndarray) -> None:
    assert image.shape == (30, 20, 3) and (image[..., 0] == image[..., 2]).all() and image[5, 7, 0] == 5 + 7


def _alpha_dropped(env: Env, image: np.ndarray) -> None:
    assert image.shape == (24, 24, 3) and tuple(image[0, 0]) == (30, 20, 10)  # BGRA (10, 20, 30, 0) → RGB


def _sixteen_bit_scaled(env: Env, image: np.ndarray) -> None:
    assert image.shape == (20, 24, 3) and tuple(image[0, 0]) == (0x30, 0x20, 0x10)


def _long_prompt(env: Env):
    prompt = "a very long prompt " + " ".join(f"word{i}" for i in range(120))
    return lambda: env.assets.pipeline.txt2img(prompt, size=64)


def _camera_row(*extra: object, backend: Callable[[Env], FakeBackend] | None = None):
    def arrange(env: Env):
        if backend is not None:
            made = backend(env)
            env.monkeypatch.setattr("mlx_sdxs.cli.open_stream_backend", lambda args: made)
        return cli(*CAMERA, *[a.format(tmp=env.tmp) if isinstance(a, str) else a for a in extra])

    return arrange


def _bad_prompts_file(env: Env):
    write(env.tmp / "prompts.txt", b"a fine prompt\n\xff\xfe not utf-8\n")
    forbid(env, SDXSPipeline, "random")  # refused before any model is built
    return cli(*CAMERA, "--prompts", env.tmp / "prompts.txt")


def _default_source(env: Env):
    env.monkeypatch.setattr("mlx_sdxs.camera.sources._camera_present", lambda index: False)
    env.log = io.StringIO()
    return lambda: open_source(None, size=(64, 48), log=env.log)


def _synthetic_with_notice(env: Env, source: Any) -> None:
    assert isinstance(source, SyntheticSource) and source.read().shape == (48, 64, 3)
    assert "no camera found" in env.log.getvalue() and "--source" in env.log.getvalue()


def _disconnecting_camera(env: Env):
    env.factory, env.log = CaptureFactory(FakeCapture(frames=10)), io.StringIO()  # later opens all fail
    camera = CameraSource(0, open_capture=env.factory, reconnect_delays=(0.01, 0.02, 0.04), log=env.log)

    def action():
        try:
            return run_loop(camera, FakeBackend(), None)
        finally:
            camera.close()

    return action


def _all_released(env: Env, result: Any) -> None:
    assert len(env.factory.opened) == 4 and all(capture.released for capture in env.factory.opened)
    assert env.log.getvalue().count("reconnecting") == 3


def _unreadable_video(env: Env):
    write(env.tmp / "broken.mp4", b"\x00garbage" * 100)
    return lambda: open_source(str(env.tmp / "broken.mp4"))


def _video(loop: bool):
    def arrange(env: Env):
        source = open_source(str(short_video(env.tmp / "clip.mp4")), fps=0, loop=loop)
        return lambda: run_loop(source, FakeBackend(), None, max_results=None if not loop else 14)

    return arrange


def _stopped(reason: str, captured: Callable[[int], bool]):
    def check(env: Env, stats) -> None:
        assert stats.stop_reason == reason and captured(stats.captured), (stats.stop_reason, stats.captured)

    return check


def _failing_backend(env: Env) -> FakeBackend:
    env.backend = FakeBackend(render_size=128, fail_at=3)
    return env.backend


def _recording_finalised(env: Env, status: int) -> None:
    assert count_video_frames(env.tmp / "session.mp4") >= 1 and env.backend.closed


def _interrupting_backend(env: Env) -> FakeBackend:
    env.backend = FakeBackend(render_size=128, cost_s=0.005, on_frame=ctrl_c_after_frames(env.tmp / "frames"))
    return env.backend


def _oom_loading(env: Env):
    model = env.converted()
    env.monkeypatch.setattr(W.mx, "load", lambda *args, **kwargs: (_ for _ in ()).throw(MemoryError()))
    return cli("txt2img", "--prompt", "x", "--model", model, "--size", "64", "-o", env.tmp / "out.png")


def _oom_generating(env: Env):
    raise_on_call(env, SDXSPipeline, "txt2img", MemoryError("std::bad_alloc"))
    return cli("txt2img", "--prompt", "x", *TINY, "-o", env.tmp / "out.png")


def _reconversion_interrupted(error: BaseException):
    """Converting over an existing folder; the second weights file write fails with `error`."""

    def arrange(env: Env):
        source = env.checkpoint()
        (env.tmp / "out").mkdir()
        (env.tmp / "out" / "previous").write_text("the earlier conversion")
        raise_on_call(env, C.mx, "save_safetensors", error, call=2)
        return cli("convert", source, "-o", env.tmp / "out")

    return arrange


def _previous_conversion_kept(env: Env, status: int) -> None:
    assert [p.name for p in (env.tmp / "out").iterdir()] == ["previous"]


def _disk_full_image(env: Env):
    raise_on_call(env, imageio.os, "replace", OSError(errno.ENOSPC, "No space left on device"))
    return cli("txt2img", "--prompt", "x", *TINY, "-o", env.tmp / "out.png")


def _image_output_written(env: Env, status: int) -> None:
    assert cv2.imread(str(env.tmp / "out.png")).shape == (64, 64, 3)


def _empty_folder_model(env: Env):
    (env.tmp / "empty").mkdir()
    return cli("txt2img", "--prompt", "x", "--model", env.tmp / "empty", "-o", env.tmp / "out.png")


ROWS = [
    # --- weights ---
    Row("weights-missing-folder", lambda env: lambda: W.load_unet(env.tmp / "nowhere" / "unet"),
        WeightsError, ("{tmp}/nowhere/unet", "no such folder")),
    Row("weights-model-flag-missing-path", lambda env: cli("txt2img", "--prompt", "x", "--model", env.tmp / "nope"),
        1, ("model '{tmp}/nope'", "no such folder")),
    Row("weights-model-flag-empty-folder", _empty_folder_model, 1,
        ("{tmp}/empty", "neither a converted mlx-sdxs folder", "nor a diffusers checkpoint"), _nothing_at("out.png")),
    Row("weights-missing-component", _missing_component, 1, ("{tmp}/model/unet", "no such folder"),
        _nothing_at("out.png")),
    Row("weights-truncated-safetensors", _truncated, WeightsError,
        ("{tmp}/model/vae/model.safetensors", "not a readable safetensors file", "incomplete download")),
    Row("weights-wrong-dtype", _wrong_dtype, WeightsError,
        ("{tmp}/model/unet/model.safetensors", "key conv_in.weight", "dtype int32", "expects floating point")),
    Row("weights-wrong-shape", _wrong_shape, WeightsError,
        ("{tmp}/model/unet/model.safetensors", "key conv_in.weight: shape", "but the model expects")),
    Row("weights-missing-and-unexpected-keys", _missing_and_unexpected, WeightsError,
        ("{tmp}/model/unet/model.safetensors", "1 missing key(s): conv_out.bias",
         "1 unexpected key(s): conv_out.extra")),
    Row("weights-pickle-bin-refused-never-unpickled", _pickle_only, WeightsError,
        ("{tmp}/ckpt/unet", "diffusion_pytorch_model.bin", "never unpickles", "safetensors"),
        _nothing_at("UNPICKLED", "out")),
    Row("config-unknown-block-type",
        _config_change("unet", down_block_types=["FancyDownBlock2D", "CrossAttnDownBlock2D"]), ConfigError,
        ("{tmp}/model/unet/config.json", "down_block_types", "FancyDownBlock2D", "not supported")),
    Row("config-invalid-value", _config_change("unet", norm_num_groups=7), ConfigError,
        ("{tmp}/model/unet/config.json", "norm_num_groups=7", "does not divide")),
    Row("config-unknown-model-class", _config_change("vae", _class_name="VQModel"), ConfigError,
        ("{tmp}/model/vae/config.json", "VQModel", "supported: AutoencoderTiny, AutoencoderKL")),
    Row("weights-incompatible-format-version", _format_version("0"), WeightsError,
        ("{tmp}/model/vae/model.safetensors", "weights format 0", f"reads format {W.FORMAT_VERSION}", "reconvert")),
    Row("weights-garbled-format-version", _format_version("v1-beta"), WeightsError,
        ("{tmp}/model/vae/model.safetensors", "weights format v1-beta", "reconvert")),
    Row("weights-not-converted-by-mlx-sdxs", _format_version(None), WeightsError,
        ("{tmp}/model/vae/model.safetensors", "not converted by mlx-sdxs", "mlx-sdxs convert")),
    Row("convert-missing-source", lambda env: cli("convert", env.tmp / "nope", "-o", env.tmp / "out"), 1,
        ("{tmp}/nope': no such folder",), _nothing_at("out")),
    # --- images ---
    Row("image-missing-file", lambda env: lambda: read_image(env.tmp / "nope.png"), ImageError,
        ("{tmp}/nope.png", "cannot read", "No such file")),
    Row("image-empty-file", _image("empty.png", b""), ImageError, ("{tmp}/empty.png: empty file",)),
    Row("image-not-an-image", _image("notes.png", b"just some text, not pixels\n" * 20), ImageError,
        ("{tmp}/notes.png: not a decodable image",)),
    Row("image-zero-by-zero", _image("zero.png", png_bytes(0, 0)), ImageError,
        ("{tmp}/zero.png", "0×0 is too small", "≥ 16 px")),
    Row("image-one-by-one", _image("dot.png", lambda: np.zeros((1, 1, 3), np.uint8)), ImageError,
        ("{tmp}/dot.png", "1×1 is too small", "≥ 16 px")),
    Row("image-grayscale", _image("grey.png", lambda: np.add.outer(np.arange(30), np.arange(20)).astype(np.uint8)),
        None, then=_grey_is_replicated),
    Row("image-rgba", _image("rgba.png", lambda: np.tile(np.array([10, 20, 30, 0], np.uint8), (24, 24, 1))),
        None, then=_alpha_dropped),
    Row("image-16-bit-png", _image("deep.png", lambda: np.tile(np.array([0x1000, 0x2000, 0x3000], np.uint16),
                                                               (20, 24, 1))), None, then=_sixteen_bit_scaled),
    Row("image-very-wide-img2img", _img2img(4000, 16), 0, then=_output_is(Path("out.png"), (64, 64, 3))),
    Row("image-very-tall-img2img", _img2img(16, 4000), 0, then=_output_is(Path("out.png"), (64, 64, 3))),
    Row("image-odd-size-img2img-crops-and-resizes", _img2img(123, 77), 0,
        then=_output_is(Path("out.png"), (64, 64, 3))),
    Row("image-8192-square-is-handled",
        _image("big.png", lambda: cv2.imencode(".png", np.full((8192, 8192, 3), 90, np.uint8),
                                               [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes()),
        None, then=_shape_is((8192, 8192, 3))),
    Row("image-png-over-the-limit", _refused_before_decoding("huge.png", lambda: png_bytes(8193, 8192, bit_depth=1)),
        ImageError, ("{tmp}/huge.png", "8193×8192 exceeds the 67,108,864-pixel limit (8192×8192)")),
    Row("image-jpeg-over-the-limit",
        _refused_before_decoding("huge.jpg", lambda: cv2.imencode(".jpg", np.zeros((9000, 8000), np.uint8))[1]
                                 .tobytes()),
        ImageError, ("{tmp}/huge.jpg", "8000×9000 exceeds the 67,108,864-pixel limit")),
    Row("output-unknown-extension", lambda env: cli("txt2img", "--prompt", "x", *TINY, "-o", env.tmp / "out.xyz"),
        1, ("{tmp}/out.xyz", "cannot encode", "'.xyz'"), _nothing_at("out.xyz")),
    # --- prompts ---
    Row("prompt-empty-works", lambda env: cli("txt2img", "--prompt", "", *TINY, "-o", env.tmp / "out.png"), 0,
        then=_output_is(Path("out.png"), (64, 64, 3))),
    Row("prompt-over-77-tokens-truncated-with-notice", _long_prompt, UserWarning,
        ("longer than the text encoder's 77 tokens", "truncated", "a very long prompt")),
    Row("prompts-file-not-utf8", _bad_prompts_file, 1,
        ("--prompts {tmp}/prompts.txt, line 2", "not valid UTF-8", "byte 0xff")),
    # --- camera / video ---
    Row("camera-index-missing", _camera_row("--source", "7"), 1, ("camera 7 did not open",)),
    Row("camera-default-falls-back-to-synthetic", _default_source, None, then=_synthetic_with_notice),
    Row("camera-disconnects-mid-run-reconnects-then-stops", _disconnecting_camera, SourceError,
        ("camera 0 stopped delivering frames", "3 reconnect attempts failed"), _all_released),
    Row("video-unreadable", _unreadable_video, SourceError, ("video file {tmp}/broken.mp4 cannot be read",)),
    Row("video-ends-and-stops", _video(loop=False), None,
        then=_stopped("source ended", lambda captured: captured == 6)),
    Row("video-ends-and-loops", _video(loop=True), None, then=_stopped("max results", lambda captured: captured >= 14)),
    # --- runtime ---
    Row("backend-raises-mid-stream",
        _camera_row("--record", "{tmp}/session.mp4", "--similarity-threshold", "0", backend=_failing_backend), 1,
        ("inference thread failed at frame", "RuntimeError: fake failure at call 3"), _recording_finalised),
    Row("ctrl-c-during-recording",
        _camera_row("--record", "{tmp}/session.mp4", "--frames-dir", "{tmp}/frames", "--similarity-threshold", "0",
                    backend=_interrupting_backend), 130, ("interrupted",), _recording_finalised),
    Row("out-of-memory-loading-weights", _oom_loading, 1,
        ("{tmp}/model/unet/model.safetensors", "out of memory"), _nothing_at("out.png")),
    Row("out-of-memory-generating", _oom_generating, 1, ("out of memory during `txt2img`", "--size"),
        _nothing_at("out.png")),
    Row("ctrl-c-during-conversion", _reconversion_interrupted(KeyboardInterrupt()), 130, ("interrupted",),
        _previous_conversion_kept),
    Row("disk-full-during-conversion",
        _reconversion_interrupted(RuntimeError("[write] Unable to write 8 bytes to file.")), 1,
        ("{tmp}/out: not written", "vae/model.safetensors", "Unable to write"), _previous_conversion_kept),
    Row("disk-full-writing-image", _disk_full_image, 1, ("{tmp}/out.png: cannot write", "No space left on device"),
        _nothing_at("out.png")),
    # --- CLI flags ---
    Row("cli-unknown-flag", lambda env: cli("txt2img", "--prompt", "p", "--bogus"), 2,
        ("unrecognized arguments: --bogus",)),
    Row("cli-strength-out-of-range", lambda env: cli("img2img", "x.png", "--prompt", "p", "--strength", "2"), 2,
        ("--strength must be in [0.02, 1.0], got 2.0",)),
    Row("cli-render-size-out-of-range", lambda env: cli("camera", "--render-size", "7"), 2,
        ("--render-size must be in [64, 2048], got 7",)),
    Row("cli-blend-out-of-range", lambda env: cli("camera", "--blend", "3"), 2,
        ("--blend must be in [0.0, 1.0], got 3",)),
    Row("cli-size-not-a-multiple-of-64", lambda env: cli("txt2img", "--prompt", "p", "--size", "100"), 2,
        ("size sides must be multiples of 64", "got 100")),
    Row("hub-model-not-cached-offline",
        lambda env: cli("txt2img", "--prompt", "p", "--model", "nobody/no-such-model", "--offline",
                        "--weights-dir", env.tmp / "weights"), 1,
        ("'nobody/no-such-model' is not in the Hugging Face cache", "--model")),
]


@pytest.mark.timeout(120)  # backstop: the first rows also build the module's shared assets
@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_is_handled(row: Row, env: Env, capfd):
    action = row.arrange(env)
    capfd.readouterr()
    start = time.perf_counter()
    if isinstance(row.expect, type) and issubclass(row.expect, Warning):
        with pytest.warns(row.expect) as record:
            result = action()
        message = " ".join(str(w.message) for w in record)
    elif isinstance(row.expect, type):
        with pytest.raises(row.expect) as raised:
            action()
        result, message = None, str(raised.value)
        assert type(raised.value) is row.expect, f"{type(raised.value).__name__} is not exactly {row.expect.__name__}"
    else:
        result, message = action(), ""
    elapsed = time.perf_counter() - start
    _, err = capfd.readouterr()

    if isinstance(row.expect, int):
        assert result == row.expect, f"exit status {result}, expected {row.expect}; stderr:\n{err}"
        message = err
        assert "Traceback" not in err, err
        error_lines = [line for line in err.splitlines() if "error" in line.lower()]
        assert len(error_lines) == (0 if row.expect in (0, 130) else 1), f"not one clear error line:\n{err}"
    assert elapsed < TIME_LIMIT_S, f"took {elapsed:.2f} s (limit {TIME_LIMIT_S} s)"
    for fragment in row.says:
        assert fragment.format(tmp=env.tmp) in message, f"{fragment.format(tmp=env.tmp)!r} not in: {message}"
    leftovers = [p for p in env.tmp.rglob("*") if ".partial" in p.name or ".old-" in p.name]
    assert not leftovers, f"partial output left behind: {leftovers}"
    if row.then is not None:
        row.then(env, result)


def test_matrix_has_one_row_per_case():
    ids = [row.id for row in ROWS]
    assert len(ids) == len(set(ids)) and len(ids) >= 25
