"""Many camera streams on one device. Each stream is a `Backend` (`BatchedStream`) that an ordinary camera loop
drives on its own threads — its own source, knobs, live state, stats and outputs — while one batcher thread
owns the backend's `StreamGroup` (and with it the device stream) and runs the frames the streams have handed
in since the last batch as one batched step: a stream with nothing new costs nothing, and on a device that
waits on the host (CUDA) a batch of streams costs about the host time of one.

One batch in flight, as a single stream has one frame in flight: batch N+1 is queued on the device before
batch N is read back. When more streams are ready than the largest batch size, they take turns
(round-robin). Knob changes are run on the batcher thread between batches, in the order they came.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from contextlib import nullcontext
from typing import Any, Callable

import numpy as np

from mlx_sdxs.errors import SDXSError
from mlx_sdxs.recipe import Recipe, RecipeSettings, Stream

#: How long a stream waits for the batcher to answer a knob change or a frame before it gives up: generous,
#: a first batch of a new size compiles (tens of seconds on a GPU without a kernel cache).
ANSWER_S = 600.0


class BatcherStopped(SDXSError):
    """The batcher closed (or failed) while a stream still waited on it."""


class StreamBatcher:
    """Owns `recipe`'s group from `start` to `close`; `recipe` itself is the first stream (`host`), and
    `open` adds more, each with its own settings. All the group's work happens on this object's thread.
    `streams`: how many streams it expects at most (the host's warm-up runs each batch size they can make)."""

    def __init__(self, recipe: Recipe, streams: int = 1):
        self.group = recipe.group
        self.streams = streams
        self._largest = max(self.group.sizes)
        self._condition = threading.Condition()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        #: Each stream's frames in the order handed in: a stream's loop hands in frame N+1 before it collects N
        #: (one in flight), and N+1's feedback needs N's latent, so they run in that order, one per batch.
        self._frames: dict[Stream, deque[tuple[np.ndarray, Future]]] = {}
        self._turn = 0
        self._stopped: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sdxs-batcher", daemon=True)
        self.host = BatchedStream(self, recipe)

    def start(self) -> None:
        self._thread.start()

    def open(self, settings: RecipeSettings) -> "BatchedStream":
        """A new stream (its prompt comes with its knobs, before its first frame)."""
        return BatchedStream(self, self.call(lambda: self.group.join(settings)))

    def warm(self) -> None:
        """Run each batch size that up to the expected streams at the host's settings can make, so that a stream
        joining later adds no compile pause for the others (every stream's state is kept)."""
        def warm() -> None:
            host = self.host.stream
            sizes = [size for size in self.group.sizes if size <= max(1, self.streams)]
            extra = [self.group.join(host.settings, prompt="") for _ in range(max(sizes) - 1)]
            try:
                for size in sizes:
                    self.group.warmup(1, [host, *extra[:size - 1]])
            finally:
                for stream in extra:
                    self.group.leave(stream)

        self.call(warm)

    # --- what streams ask for, from their own threads -------------------------------------------------
    def call(self, action: Callable[[], Any]) -> Any:
        """Run `action` on the batcher thread (before the next batch) and return its result or raise its error."""
        future: Future = Future()
        with self._condition:
            self._check()
            self._calls.append((action, future))
            self._condition.notify()
        return _answer(future)

    def submit(self, stream: Stream, frame: np.ndarray) -> Future:
        future: Future = Future()
        with self._condition:
            self._check()
            self._frames.setdefault(stream, deque()).append((frame, future))
            self._condition.notify()
        return future

    def _check(self) -> None:
        if self._stopped is not None:
            raise BatcherStopped(f"the batch of streams stopped: {self._stopped}")

    # --- the batcher thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        in_flight, frames = None, {}
        try:
            with self.group.worker():
                while True:
                    calls, frames = self._take(wait=in_flight is None)
                    if calls is None:
                        break
                    for action, future in calls:
                        _settle(future, action)
                    pending = self.group.submit({s: f for s, (f, _) in frames.items()}) if frames else None
                    if in_flight is not None:
                        self._deliver(*in_flight)
                    in_flight = (pending, frames) if pending is not None else None
                if in_flight is not None:
                    self._deliver(*in_flight)
        except BaseException as error:  # noqa: BLE001 — handed to every stream that waits
            self._stop(error)
            taken = [*frames.values(), *(in_flight[1].values() if in_flight is not None else ())]
            for _, future in taken:  # the frames this thread held when it failed
                if not future.done():
                    future.set_exception(BatcherStopped(f"the batch of streams failed: {error}"))
        else:
            self._stop(BatcherStopped("closed"))

    def _take(self, wait: bool) -> tuple[list | None, dict]:
        """The knob changes and frames handed in since the last batch (None when closing). Frames of at most the
        largest batch size's streams, taking turns."""
        with self._condition:
            while wait and not self._calls and not self._frames and self._stopped is None:
                self._condition.wait()
            if self._stopped is not None:
                return None, {}
            calls = list(self._calls)
            self._calls.clear()
            ready = list(self._frames)
            if len(ready) > self._largest:
                self._turn %= len(ready)
                ready = (ready[self._turn:] + ready[:self._turn])[:self._largest]
                self._turn += self._largest
            taken = {stream: self._frames[stream].popleft() for stream in ready}
            for stream in ready:
                if not self._frames[stream]:
                    del self._frames[stream]
            return calls, taken

    def _deliver(self, pending, frames: dict) -> None:
        results = self.group.collect(pending)
        for stream, (_, future) in frames.items():
            future.set_result(results[stream])

    def _stop(self, error: BaseException) -> None:
        with self._condition:
            if self._stopped is None:
                self._stopped = error
            waiting = [future for _, future in self._calls]
            waiting += [future for queue in self._frames.values() for _, future in queue]
            self._calls.clear()
            self._frames.clear()
            self._condition.notify_all()
        for future in waiting:
            if not future.done():
                future.set_exception(BatcherStopped(f"the batch of streams stopped: {self._stopped}"))

    def close(self) -> None:
        """Stop after the batch in flight, fail what still waits, release every stream and the engine."""
        if self._thread.is_alive():
            self._stop(BatcherStopped("closed"))
            self._thread.join()
        self.group.close()


class BatchedStream:
    """One stream of a `StreamBatcher`, as the camera loop's `Backend`: its calls are run by the batcher."""

    profile_stages = False

    def __init__(self, batcher: StreamBatcher, stream: Stream):
        self.batcher, self.stream = batcher, stream
        self.name, self.label, self.controlled = stream.engine.name, stream.engine.label, stream.controlled
        self.render_size = stream.settings.render_size
        self._closed = False

    @property
    def last_stage_ms(self) -> dict[str, float]:
        """The newest batch's times: every stream in it waited as long."""
        return self.batcher.group.last_stage_ms

    def _call(self, method: str, *args: Any) -> Any:
        return self.batcher.call(lambda: getattr(self.stream, method)(*args))

    def set_prompt(self, prompt: str | None, prompt_b: str | None = None,
                   blend: float | None = None) -> tuple[str, ...]:
        return self._call("set_prompt", prompt, prompt_b, blend)

    def set_prompt_blend(self, blend: float) -> None:
        self._call("set_prompt_blend", blend)

    def set_feedback(self, feedback: float) -> None:
        self._call("set_feedback", feedback)

    def set_seed_blend(self, blend: float) -> None:
        self._call("set_seed_blend", blend)

    def set_control_mode(self, mode: str) -> None:
        self._call("set_control_mode", mode)

    def set_control_strength(self, strength: float) -> None:
        self._call("set_control_strength", strength)

    def worker(self):
        """No device work on the caller's thread: the batcher's thread owns it."""
        return nullcontext()

    def warmup(self) -> None:
        """The host stream warms every batch size up (`StreamBatcher.warm`); a stream that joins later needs none."""
        if self is self.batcher.host:
            self.batcher.warm()

    def open_stream(self) -> "BatchedStream":
        """Another stream in this stream's batch, with the same settings (the studio's visitors)."""
        return self.batcher.open(self.stream.settings)

    def submit(self, frame_bgr: np.ndarray) -> Future:
        return self.batcher.submit(self.stream, frame_bgr)

    def collect(self, pending: Future) -> np.ndarray:
        return _answer(pending)

    def process(self, frame_bgr: np.ndarray) -> np.ndarray:
        return self.collect(self.submit(frame_bgr))

    def close(self) -> None:
        """Leave the batch; the host stream closes the batcher (and with it every stream and the engine)."""
        if self._closed:
            return
        self._closed = True
        if self is self.batcher.host:
            self.batcher.close()
            return
        try:
            self.batcher.call(lambda: self.batcher.group.leave(self.stream))
        except BatcherStopped:
            pass  # the batcher released every stream already


def _settle(future: Future, action: Callable[[], Any]) -> None:
    try:
        future.set_result(action())
    except BaseException as error:  # noqa: BLE001 — raised in the caller's thread
        future.set_exception(error)


def _answer(future: Future) -> Any:
    try:
        return future.result(ANSWER_S)
    except TimeoutError:
        raise BatcherStopped(f"the batch of streams did not answer within {ANSWER_S:.0f} s") from None
