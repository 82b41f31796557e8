"""`stylize`'s videos: every frame, in order and none dropped, through the camera recipe (fixed noise,
feedback, prompt and its blends, control for a ControlNet model) at a render size of the video's aspect,
resized back to the video's size, and written as H.264 in a fragmented MP4 like the recordings, at the
input's own timestamps, with its audio packets copied unchanged (remuxed, not re-encoded). PyAV does the
reading and writing (the `studio` extra). Several videos run at once as the streams of one `StreamGroup`: one
batched step per frame, each stream's frames what it would get alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import cv2
import numpy as np

from mlx_sdxs.camera.outputs import FRAGMENTED_MP4, h264_options
from mlx_sdxs.camera.presenter import draw_banner
from mlx_sdxs.errors import SDXSError, SourceError
from mlx_sdxs.jobs.plan import VideoJob, render_size_for
from mlx_sdxs.recipe import RecipeSettings

#: The recordings' fragmented MP4, where copied audio that starts before 0 (an AAC encoder's priming samples)
#: moves only itself: by default the muxer would shift every stream once the first video frame is out.
CONTAINER_OPTIONS = {**FRAGMENTED_MP4, "avoid_negative_ts": "make_non_negative"}
#: Called with each output frame (uint8 BGR, the video's size) just before it is encoded (tests, previews).
FrameHook = Callable[[np.ndarray], None]


def require_av():
    """PyAV with libx264, or an error saying how to get it."""
    try:
        import av
    except ImportError:
        raise SDXSError("stylize reads and writes video with PyAV: pip install 'mlx-sdxs[studio]'") from None
    if "libx264" not in av.codecs_available:
        raise SDXSError("this PyAV has no libx264 encoder: pip install --force-reinstall av (its wheels ship it)")
    return av


def probe(path: str | Path) -> dict[str, Any]:
    """The first video stream's size, frame count and rate (count from the container, else decoded), and how
    many audio streams there are; an error naming the file when it is not a video."""
    av = require_av()
    container, stream = _open_video(av, path)
    with container:
        try:
            frames = stream.frames or sum(1 for _ in container.decode(stream))
        except av.FFmpegError as exc:
            raise SourceError(f"{path}: not a video PyAV can read ({exc})") from None
        return {"size": (stream.codec_context.width, stream.codec_context.height), "frames": frames,
                "fps": float(stream.average_rate or 0), "audio": len(container.streams.audio)}


def _open_video(av, path: str | Path):
    """(the opened container, its first video stream); an error naming the file when it is not a video."""
    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise SourceError(f"{path}: not a video PyAV can read ({exc})") from None
    if not container.streams.video:
        container.close()
        raise SourceError(f"{path}: no video stream")
    return container, container.streams.video[0]


def stylize_video(pipeline, job: VideoJob, source: str | Path, dest: Path,
                  progress: Callable[[int], None] | None = None, hook: FrameHook | None = None) -> dict[str, Any]:
    """`source` stylised into `dest` (written there directly: the caller names a partial file and renames it).
    Returns the output's frame count and sizes."""
    infos: list[dict[str, Any]] = []
    stylize_videos(pipeline, job, [(source, dest)], lambda item, step: progress and progress(step),
                   lambda item, info: infos.append(info), hook=hook)
    return infos[0]


def stylize_videos(pipeline, job: VideoJob, items: Sequence[tuple[str | Path, Path]],
                   progress: Callable[[int, int], None], done: Callable[[int, dict[str, Any]], None],
                   streams: int = 1, hook: FrameHook | None = None) -> None:
    """Each (source, dest) of `items` stylised, up to `streams` videos at once as the streams of one group (one
    compiled batch per frame step; each stream's frames are what it would get alone). `progress(i, frames)` as
    item i's frames are written, `done(i, info)` once its file is closed. Any error closes every open file."""
    av = require_av()
    group = pipeline.stream_group()
    waiting = list(enumerate(items))[::-1]
    running: dict[Any, _VideoRun] = {}
    pending = None
    try:
        while waiting or running or pending:
            while waiting and len(running) < streams:
                index, (source, dest) = waiting.pop()
                run = _VideoRun(av, group, job, index, source, dest, pipeline.label, hook)
                running[run.stream] = run
            frames, ended = {}, []
            for stream, run in running.items():
                frame = run.next_frame()
                if frame is None:
                    ended.append(run)
                else:
                    frames[stream] = frame
            submitted = (group.submit(frames), {stream: running[stream].pts for stream in frames}) if frames else None
            if pending is not None:  # one batch in flight: batch N+1 is queued before batch N is read back
                for stream, image in group.collect(pending[0]).items():
                    running[stream].write(image, pending[1][stream])
                    progress(running[stream].index, 1)
            pending = submitted
            for run in ended:  # (their last frames were in the batch just collected)
                del running[run.stream]
                group.leave(run.stream)
                done(run.index, run.close())
    finally:
        for run in running.values():
            run.abort()


class _VideoRun:
    """One video being stylised: its demuxer (audio packets are copied to the output as they come), its stream
    in the group, and its output."""

    def __init__(self, av, group, job: VideoJob, index: int, source: str | Path, dest: Path, label: str | None,
                 hook: FrameHook | None):
        self.index, self.pts = index, None
        self._input, video_in = _open_video(av, source)
        try:
            video_in.thread_type = "AUTO"
            self.size = (video_in.codec_context.width, video_in.codec_context.height)
            self.stream = group.join(_settings(job, self.size))
            self.stream.set_prompt(job.prompt, job.prompt_b, job.prompt_blend if job.prompt_b else None)
            self._output = av.open(str(dest), "w", format="mp4", options=CONTAINER_OPTIONS)
        except BaseException:
            self._input.close()
            raise
        self._writer = _Writer(av, self._output, video_in, self.size, label, hook)
        audio_in = list(self._input.streams.audio)
        self._audio = {stream.index: self._output.add_stream_from_template(stream) for stream in audio_in}
        self._frames = self._decode(video_in, audio_in)

    def _decode(self, video_in, audio_in) -> Iterator[tuple[np.ndarray, int | None]]:
        for packet in self._input.demux(video_in, *audio_in):
            if packet.stream.type == "audio":
                if packet.dts is not None:  # (the demuxer's end-of-stream packet carries nothing)
                    packet.stream = self._audio[packet.stream.index]
                    self._output.mux(packet)
                continue
            for frame in packet.decode():
                yield frame.to_ndarray(format="bgr24"), frame.pts

    def next_frame(self) -> np.ndarray | None:
        """The next frame (uint8 BGR), its timestamp kept in `pts`; None at the end."""
        item = next(self._frames, None)
        if item is None:
            return None
        frame, self.pts = item
        return frame

    def write(self, frame: np.ndarray, pts: int | None) -> None:
        self._writer.write(frame, pts)

    def close(self) -> dict[str, Any]:
        self._writer.close()
        self._output.close()
        self._input.close()
        width, height = self.size
        return {"frames": self._writer.frames, "size": f"{width}x{height}",
                "render_size": self.stream.settings.describe_size()}

    def abort(self) -> None:
        self._output.close()
        self._input.close()


def _settings(job: VideoJob, size: tuple[int, int]) -> RecipeSettings:
    return RecipeSettings(render_size=render_size_for(size, job.render_side), feedback=job.feedback, seed=job.seed,
                          strength=job.strength, seed_b=job.seed_b,
                          seed_blend=job.seed_blend, control=job.control,
                          control_strength=job.control_strength)


class _Writer:
    """The stylised video stream: frames resized back to the input's size, on the input's timestamps."""

    def __init__(self, av, output, video_in, size: tuple[int, int], label: str | None, hook: FrameHook | None):
        rate = video_in.average_rate or video_in.guessed_rate or 30
        self._stream = output.add_stream("libx264", rate=rate)
        width, height = size
        # yuv420p needs even sides: drop a last odd row/column rather than scale the picture (as recordings do).
        self._stream.width, self._stream.height = width - width % 2, height - height % 2
        self._stream.pix_fmt = "yuv420p"
        self._stream.codec_context.time_base = video_in.time_base
        self._stream.options = h264_options(float(rate))
        self._output, self._av, self._time_base = output, av, video_in.time_base
        self._size, self._label, self._hook = size, label, hook
        self.frames = 0

    def write(self, frame: np.ndarray, pts: int | None) -> None:
        width, height = self._size
        frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_LINEAR)
        if self._label:
            draw_banner(frame, self._label)
        if self._hook is not None:
            self._hook(frame)
        picture = self._av.VideoFrame.from_ndarray(
            np.ascontiguousarray(frame[:self._stream.height, :self._stream.width]), format="bgr24")
        picture.pts, picture.time_base = pts, self._time_base
        for packet in self._stream.encode(picture):
            self._output.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self._stream.encode():
            self._output.mux(packet)
