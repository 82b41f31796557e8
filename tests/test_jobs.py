"""Bulk runs end to end on the random-weight model: prompt files × seeds, folders of images, whole videos;
the manifest and resume after SIGTERM; the same jobs on a local 2-worker Ray instance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from mlx_sdxs.cli import main
from mlx_sdxs.jobs import plan
from mlx_sdxs.jobs.manifest import MANIFEST_NAME, Manifest, held_signals
from mlx_sdxs.jobs.work import labelled
from mlx_sdxs.pipeline import SDXSPipeline

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--model", "random-tiny"]
SUBJECTS = ("a red fox", "a lighthouse", "a teapot", "a castle", "a whale", "a bicycle", "an owl", "a cactus",
            "a violin", "a mountain lake", "a robot", "a sailboat")
#: Outputs are uint8 images of the same float computation: batching or sharding may only move a rounding.
PIXEL_TOLERANCE = 1


def prompts_file(path: Path, count: int = 12) -> Path:
    path.write_text("# subjects\n" + "".join(f"{SUBJECTS[i % 12]}, study {i}\n" for i in range(count)))
    return path


def manifest(out: Path) -> list[dict]:
    path = out / MANIFEST_NAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def outputs(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.name != MANIFEST_NAME}


def rgb(path: Path) -> np.ndarray:
    return cv2.imread(str(path)).astype(np.int16)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_sdxs.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def wait_for(condition, what: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll `condition` until it holds; fail naming `what` at the deadline or when `process` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process is None or process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


# --- planning and the manifest (no model) ---------------------------------------------------------------------
@pytest.mark.policy_independent
def test_seed_lists_and_names():
    assert plan.seed_list("0-3") == (0, 1, 2, 3)
    assert plan.seed_list("0,5,9") == (0, 5, 9)
    assert plan.seed_list("7, 0-1") == (7, 0, 1)
    for bad in ("3-1", "a", "1,1", "-2", "0-"):
        with pytest.raises(Exception, match="--seeds"):
            plan.seed_list(bad)
    tasks = plan.txt2img_tasks(["A Fox!", "a fox"], (0, 1))
    assert [t.file for t in tasks] == ["00001-a-fox-s0.png", "00001-a-fox-s1.png", "00002-a-fox-s0.png",
                                       "00002-a-fox-s1.png"]
    assert plan.render_size_for((1920, 1080), 512) == (512, 256)
    assert plan.render_size_for((160, 96), 128) == (128, 64)
    assert plan.render_size_for((720, 1280), 640) == (384, 640)


@pytest.mark.policy_independent
def test_a_manifest_cut_by_a_crash_keeps_its_whole_lines(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / MANIFEST_NAME).write_text('{"file": "a.png", "seed": 0}\n{"file": "b.p')
    loaded = Manifest(tmp_path)
    assert list(loaded.entries) == ["a.png"]
    assert (tmp_path / MANIFEST_NAME).read_text() == '{"file": "a.png", "seed": 0}\n'  # cut to its whole lines
    assert loaded.done("a.png", {"seed": 0}) and not loaded.done("b.png", {"seed": 0})
    with pytest.raises(Exception, match="other settings"):
        loaded.done("a.png", {"seed": 1})
    with pytest.raises(Exception, match="another run is writing"):
        Manifest(tmp_path)  # a second run into the same folder
    loaded.close()
    Manifest(tmp_path).close()


@pytest.mark.policy_independent
@pytest.mark.timeout(20)
def test_signals_are_held_while_an_output_is_committed():
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with held_signals():
            signal.raise_signal(signal.SIGINT)
            reached.append("after the signal")  # still inside: delivered on the way out
    assert reached == ["after the signal"]


@pytest.mark.policy_independent
@pytest.mark.parametrize("case", ["empty prompts", "missing prompts", "bad seeds", "out dir under a file",
                                  "no out dir", "missing image"])
def test_bad_bulk_input_is_one_line_and_writes_nothing(tmp_path, case):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = tmp_path / "out"
    args, code = {
        "empty prompts": (["txt2img", "--prompts-file", str(empty), "--out-dir", str(out)], 1),
        "missing prompts": (["txt2img", "--prompts-file", str(tmp_path / "nope.txt"), "--out-dir", str(out)], 1),
        "bad seeds": (["txt2img", "--prompt", "a", "--seeds", "5-2", "--out-dir", str(out)], 2),
        "out dir under a file": (["txt2img", "--prompt", "a", "--seeds", "0-1", "--out-dir", str(blocker / "o")], 1),
        "no out dir": (["txt2img", "--prompt", "a", "--seeds", "0-1"], 1),
        "missing image": (["img2img", str(tmp_path / "nope.png"), "--prompt", "a", "--out-dir", str(out)], 1),
    }[case]
    result = run_cli(*args, *MODEL, "--size", "64")
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and "error:" in lines[-1], result.stderr
    assert code == 2 or len(lines) == 1, result.stderr  # (argparse's own errors come after the usage lines)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "file"]


# --- bulk txt2img / img2img --------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_a_batched_bulk_run_makes_the_images_of_single_runs(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["txt2img", "--prompts-file", str(prompts_file(tmp_path / "p.txt")), "--seeds", "0-1",
                 "--batch-size", "4", "--out-dir", str(out), *MODEL, "--size", "64"]) == 0
    assert "24/24 img" in capsys.readouterr().err  # the progress bar's last line
    entries = manifest(out)
    assert len(entries) == 24 and outputs(out) == {e["file"] for e in entries}
    assert {(e["prompt"], e["seed"]) for e in entries} == {(f"{SUBJECTS[i]}, study {i}", s)
                                                            for i in range(12) for s in (0, 1)}
    assert all(e["model"] == "random-tiny" and e["size"] == "64x64" and e["bytes"] > 0 for e in entries)
    # 24 single runs: the first through the command, all through the pipeline the command loads (the same
    # seeded random weights), each labelled as the command labels it.
    single = tmp_path / "single.png"
    assert main(["txt2img", "--prompt", entries[0]["prompt"], "--seed", str(entries[0]["seed"]), *MODEL,
                 "--size", "64", "-o", str(single)]) == 0
    pipeline = SDXSPipeline.random("random-tiny")
    for entry in entries:
        image = labelled(pipeline.txt2img(entry["prompt"], seed=entry["seed"], size=64), pipeline.label)
        expected = cv2.cvtColor(image, cv2.COLOR_RGB2BGR).astype(np.int16)
        assert np.abs(rgb(out / entry["file"]) - expected).max() <= PIXEL_TOLERANCE, entry["file"]
    assert np.array_equal(rgb(single), rgb(out / entries[0]["file"]))
    # A rerun finds everything done and loads no model.
    assert main(["txt2img", "--prompts-file", str(tmp_path / "p.txt"), "--seeds", "0-1", "--batch-size", "4",
                 "--out-dir", str(out), *MODEL, "--size", "64"]) == 0
    assert "all 24 images are already" in capsys.readouterr().err
    assert len(manifest(out)) == 24


@pytest.mark.timeout(300)
def test_sigterm_halfway_then_a_rerun_completes_with_every_file_once(tmp_path):
    out = tmp_path / "out"
    args = ["txt2img", "--prompts-file", str(prompts_file(tmp_path / "p.txt")), "--seeds", "0-5",
            "--out-dir", str(out), *MODEL, "--size", "128"]
    run = subprocess.Popen([sys.executable, "-m", "mlx_sdxs.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(manifest(out)) >= 3, "third manifest line", 180, run)
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 130, run.stderr.read()
    finally:
        run.kill()
    first = manifest(out)
    assert 3 <= len(first) < 72, "the run was not stopped halfway"
    assert outputs(out) == {e["file"] for e in first}, "a partial file or a file without its manifest line"
    stamps = {e["file"]: (out / e["file"]).stat().st_mtime_ns for e in first}

    result = run_cli(*args, timeout=240)
    assert result.returncode == 0, result.stderr
    assert f"resuming: {len(first)} of 72 images are done" in result.stderr
    final = manifest(out)
    assert len(final) == 72 and len({e["file"] for e in final}) == 72  # whole, no duplicate line
    assert outputs(out) == {e["file"] for e in final}  # no partial, none missing
    assert {t.file for t in plan.txt2img_tasks([f"{SUBJECTS[i]}, study {i}" for i in range(12)],
                                               tuple(range(6)))} == outputs(out)
    assert all((out / f).stat().st_mtime_ns == stamp for f, stamp in stamps.items()), "a done file was rewritten"


@pytest.mark.timeout(200)
def test_bulk_img2img_takes_files_and_folders(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    scene = np.random.default_rng(0).integers(0, 256, (80, 120, 3), np.uint8)
    for name in ("a.png", "b.jpg"):
        cv2.imwrite(str(folder / name), scene)
    (folder / "notes.txt").write_text("not an image")
    single = tmp_path / "c.png"
    cv2.imwrite(str(single), scene[:, ::-1])
    out = tmp_path / "out"
    assert main(["img2img", str(folder), str(single), "--prompt", "ink", "--seeds", "0,3", "--out-dir", str(out),
                 *MODEL, "--size", "64"]) == 0
    assert outputs(out) == {f"{stem}-s{seed}.png" for stem in "abc" for seed in (0, 3)}
    entry = next(e for e in manifest(out) if e["file"] == "c-s3.png")
    assert entry["input"] == str(single.resolve()) and entry["seed"] == 3
    one = tmp_path / "one.png"
    assert main(["img2img", str(single), "--prompt", "ink", "--seed", "3", *MODEL, "--size", "64", "-o", str(one)]) == 0
    assert np.abs(rgb(out / "c-s3.png") - rgb(one)).max() <= PIXEL_TOLERANCE


# --- stylize -----------------------------------------------------------------------------------------------------
CLIP_FPS, CLIP_SECONDS, CLIP_SIZE, AUDIO_RATE = 10, 10, (160, 96), 16000
#: Mean |decoded − encoded| of one frame, in grey levels: libx264 at CRF 20 on these random-weight frames
#: measured 1.3 on average, 1.5 at worst; 4 leaves room for other libx264 builds, and a wrong frame is ~50.
CODEC_TOLERANCE = 4.0


def make_clip(path: Path, seed: int, audio: bool) -> Path:
    """10 s of a moving synthetic scene at 10 fps, with a 440 Hz AAC track if `audio`, made with PyAV."""
    import av

    from mlx_sdxs.camera.sources import SyntheticSource

    scene = SyntheticSource(*CLIP_SIZE, fps=CLIP_FPS, seed=seed)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=CLIP_FPS)
        video.width, video.height, video.pix_fmt = *CLIP_SIZE, "yuv420p"
        sound = container.add_stream("aac", rate=AUDIO_RATE) if audio else None
        for index in range(CLIP_FPS * CLIP_SECONDS):
            frame = av.VideoFrame.from_ndarray(scene.render(index), format="bgr24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if sound is not None:
            tone = np.sin(2 * np.pi * 440 * np.arange(AUDIO_RATE * CLIP_SECONDS) / AUDIO_RATE).astype(np.float32)
            for start in range(0, tone.size, 1024):
                samples = av.AudioFrame.from_ndarray(0.3 * np.stack([tone[start:start + 1024]] * 2), format="fltp",
                                                     layout="stereo")
                samples.sample_rate, samples.pts = AUDIO_RATE, start
                container.mux(sound.encode(samples))
            container.mux(sound.encode())
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    pytest.importorskip("av")
    return make_clip(tmp_path_factory.mktemp("video") / "clip.mp4", seed=0, audio=True)


def decoded(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="bgr24") for frame in container.decode(video=0)]


def audio_packets(path: Path) -> list[bytes]:
    import av

    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(audio=0) if p.size]


def stylize_args(clip: Path, out: Path, side: int = 128, *more: Path) -> list[str]:
    return ["stylize", str(clip), *map(str, more), "--out-dir", str(out), *MODEL, "--prompt", "a watercolor",
            "--render-side", str(side)]


@pytest.mark.timeout(300)
def test_stylize_keeps_every_frame_the_rate_and_the_sound_and_equals_the_recipe(tmp_path, clip):
    import av

    from mlx_sdxs.jobs.video import stylize_video
    from mlx_sdxs.recipe import RecipeSettings

    out = tmp_path / "out"
    other = make_clip(tmp_path / "silent.mp4", seed=1, audio=False)  # run beside clip.mp4 as a batch of two
    assert main([*stylize_args(clip, out, 128, other), "--streams", "2"]) == 0
    result = out / "clip.mp4"
    assert outputs(out) == {"clip.mp4", "silent.mp4"}
    with av.open(str(out / "silent.mp4")) as container:
        assert not container.streams.audio and len(decoded(out / "silent.mp4")) == CLIP_FPS * CLIP_SECONDS
    with av.open(str(result)) as container, av.open(str(clip)) as source:
        video, original = container.streams.video[0], source.streams.video[0]
        assert (video.codec_context.name, video.width, video.height) == ("h264", *CLIP_SIZE)
        assert video.guessed_rate == Fraction(CLIP_FPS)
        # Every frame at its own time: the output's timestamps are the input's.
        assert [f.pts for f in container.decode(video)] == [f.pts for f in source.decode(original)]
        assert len(container.streams.audio) == 1
        assert float(container.duration) / 1e6 == pytest.approx(float(source.duration) / 1e6, abs=1 / CLIP_FPS)
    assert audio_packets(result) == audio_packets(clip), "the audio was not copied unchanged"
    written = decoded(result)
    assert len(written) == CLIP_FPS * CLIP_SECONDS == len(decoded(clip))

    # Frame by frame, the recipe: a stream of the same settings fed the same decoded frames.
    pipeline = SDXSPipeline.random("random-tiny")
    hooked: list[np.ndarray] = []
    stylize_video(pipeline, plan.VideoJob("random-tiny", (), "a watercolor", 128), clip, tmp_path / "again.mp4",
                  hook=lambda frame: hooked.append(frame.astype(np.int16)))
    for source, output, exact in ((clip, written, hooked), (other, decoded(out / "silent.mp4"), None)):
        recipe = pipeline.stream(RecipeSettings(render_size=(128, 64)), "a watercolor")
        for index, frame in enumerate(decoded(source)):
            expected = labelled(cv2.resize(recipe.process(frame), CLIP_SIZE, interpolation=cv2.INTER_LINEAR),
                                pipeline.label).astype(np.int16)
            if exact is not None:  # before H.264: the recipe's frames, to a rounding
                assert np.abs(exact[index] - expected).mean() <= 1.0, f"{source.name} frame {index}"
            assert np.abs(output[index] - expected).mean() <= CODEC_TOLERANCE, f"{source.name} frame {index}"

    # Resume per file: a finished video is skipped; an unfinished one's partial file is cleared and redone.
    stamp = result.stat().st_mtime_ns
    (out / ".other.partial.mp4").write_bytes(b"cut off")
    assert main(stylize_args(clip, out)) == 0
    assert result.stat().st_mtime_ns == stamp and outputs(out) == {"clip.mp4", "silent.mp4"}


# --- Ray ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _image_job(count: int, seeds: tuple[int, ...], size: int, batch: int) -> plan.ImageJob:
    prompts = [f"{SUBJECTS[i % 12]}, study {i}" for i in range(count)]
    return plan.ImageJob("txt2img", "random-tiny", (size, size), plan.txt2img_tasks(prompts, seeds), batch)


@pytest.mark.timeout(300)
def test_ray_with_two_workers_makes_the_local_images_and_videos(tmp_path, ray_instance, clip):
    local, remote = tmp_path / "local", tmp_path / "ray"
    args = ["txt2img", "--prompts-file", str(prompts_file(tmp_path / "p.txt")), "--seeds", "0-1", "--batch-size",
            "4", *MODEL, "--size", "64"]
    assert main([*args, "--out-dir", str(local)]) == 0
    assert main([*args, "--out-dir", str(remote), "--ray", "--ray-workers", "2"]) == 0
    assert outputs(local) == outputs(remote) and len(manifest(remote)) == 24
    for name in outputs(local):
        assert np.abs(rgb(local / name) - rgb(remote / name)).max() <= PIXEL_TOLERANCE, name
    assert ray_instance.is_initialized(), "a Ray instance the caller started must survive the job"

    assert main(stylize_args(clip, tmp_path / "v-local", side=64)) == 0
    assert main([*stylize_args(clip, tmp_path / "v-ray", side=64), "--ray", "--ray-workers", "2"]) == 0
    for mine, theirs in zip(decoded(tmp_path / "v-local" / "clip.mp4"), decoded(tmp_path / "v-ray" / "clip.mp4"),
                            strict=True):
        assert np.array_equal(mine, theirs)


@pytest.mark.timeout(300)
def test_a_ray_worker_killed_mid_job_is_replaced_and_every_file_is_written_once(tmp_path, ray_instance):
    from mlx_sdxs.backends import BackendChoice
    from mlx_sdxs.jobs.cluster import RayPool
    from mlx_sdxs.jobs.run import run_images

    job = _image_job(12, (0, 1, 2, 3), 128, 1)
    out = tmp_path / "out"
    pool = RayPool(BackendChoice(model="random-tiny"), workers=2)
    victim = pool.pids()[0]
    failure: list[BaseException] = []

    class KeptOpen:  # the job closes its pool: keep this one to ask it afterwards
        images, close = pool.images, lambda self: None

    def drive() -> None:
        try:
            run_images(job, out, KeptOpen)
        except BaseException as exc:  # handed to the test's thread
            failure.append(exc)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    wait_for(lambda: len(manifest(out)) >= 2, "second manifest line", 120)
    os.kill(victim, signal.SIGKILL)
    assert len(manifest(out)) < len(job.tasks), "the job ended before the worker was killed"
    driver.join(timeout=240)
    assert not driver.is_alive() and not failure, failure
    entries = manifest(out)
    assert len(entries) == len(job.tasks) == len({e["file"] for e in entries})
    assert outputs(out) == {t.file for t in job.tasks}
    replaced = pool.pids()
    pool.close()
    assert victim not in replaced and len(replaced) == 2, "the killed worker was not restarted"
