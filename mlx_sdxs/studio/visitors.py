"""One stream per studio visitor. A visitor's page gets a camera loop of its own — its webcam or drawing canvas
as the source, its own knobs, live state, stats and AI view — on a stream of the host's batch (the backend's
`open_stream`: every stream's frame runs in one batched step on the device). A visitor never receives another
visitor's frames, prompt or status.

At most `max_streams` visitors stream at once; the next ones wait in line, in arrival order, told their place
(and may watch the host's stream meanwhile); a visitor who leaves frees the stream at once for the first in
line. Seats are handed out on the server's event loop; streams are opened and closed off it (`to_thread`).
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from typing import Any, Callable

from mlx_sdxs.camera.broadcast import Broadcast
from mlx_sdxs.camera.outputs import AI_VIEW
from mlx_sdxs.camera.picker import BROWSER_SOURCE, DRAW_SOURCE, BrowserSource, SwitchableSource, control_mode_for
from mlx_sdxs.camera.presenter import Presenter
from mlx_sdxs.camera.side import SideStream, side_control
from mlx_sdxs.camera.state import LoopControl
from mlx_sdxs.errors import SDXSError
from mlx_sdxs.studio.controls import Controls


class VisitorStream:
    """A visitor's own camera loop (a `SideStream`), on its own thread, from `start` until `close`."""

    def __init__(self, backend, host_control: LoopControl, fps: float, output_size: int, first: str = BROWSER_SOURCE):
        self.webcam, self.canvas = BrowserSource(fps), BrowserSource(fps, "drawing canvas")
        source = SwitchableSource({BROWSER_SOURCE: lambda: self.webcam, DRAW_SOURCE: lambda: self.canvas}, first, fps)
        control = side_control(host_control)  # the host's knob values to start from; the visitor's own from then on
        if control.state.controlled:
            control.request(control=control_mode_for(first))
        self.ai = Broadcast(AI_VIEW)
        self.controls = Controls(control, source, None, Counter())
        self._loop = SideStream(source, backend, control, Presenter(output_size=output_size, sinks=[self.ai],
                                                                    overlay=False), name="sdxs-visitor")

    def start(self) -> None:
        self._loop.start()

    def status(self) -> dict[str, Any]:
        return {**self.controls.status(), "stream": "own"}

    def close(self) -> None:
        self._loop.close()


#: The most visitors' streams a studio takes (--max-streams, and the host's live change of it).
MOST_STREAMS = 64
#: Controls a visitor sends while in line, kept (the newest) for its stream: its prompt is its first frame's.
KEPT_CONTROLS = 32


class Seat:
    """A visitor's place: a stream of its own, or a place in line (1 = next)."""

    def __init__(self) -> None:
        self.stream: VisitorStream | None = None
        self.place = 0
        self.kept: deque[str] = deque(maxlen=KEPT_CONTROLS)
        #: Watch the host's stream while in line.
        self.watching = False
        self.changed = asyncio.Event()


class Visitors:
    """The seats of the studio's visitors. `open_stream()` makes a `VisitorStream` (blocking: run off the event
    loop), or None while the model is still loading."""

    def __init__(self, open_stream: Callable[[], VisitorStream | None], max_streams: int,
                 log: Callable[[str], None] = print):
        self.open_stream, self.max_streams, self.log = open_stream, max_streams, log
        self._seats: list[Seat] = []
        self._lock = asyncio.Lock()

    @property
    def streaming(self) -> int:
        return sum(seat.stream is not None for seat in self._seats)

    @property
    def full(self) -> bool:
        """Every stream is taken (else a visitor in line waits for the model to load)."""
        return self.streaming >= self.max_streams

    @property
    def waiting(self) -> int:
        return sum(seat.stream is None for seat in self._seats)

    async def arrive(self) -> Seat:
        seat = Seat()
        self._seats.append(seat)
        await self.fill()
        return seat

    async def leave(self, seat: Seat) -> None:
        """The visitor is gone: its stream closes at once and the first in line gets one."""
        self._seats.remove(seat)
        if seat.stream is not None:
            await asyncio.to_thread(seat.stream.close)
        await self.fill()

    async def resize(self, max_streams: int) -> None:
        """The host changed --max-streams: the newest streams beyond it go back in line, first of the line."""
        self.max_streams = max_streams
        async with self._lock:
            over = [seat for seat in self._seats if seat.stream is not None][max_streams:]
            for seat in over:
                stream, seat.stream = seat.stream, None
                await asyncio.to_thread(stream.close)
        await self.fill()

    async def fill(self) -> None:
        """Give streams to the first in line while there is room (none while the model loads); renumber the line."""
        async with self._lock:
            for seat in [seat for seat in self._seats if seat.stream is None]:
                if self.streaming >= self.max_streams:
                    break
                try:
                    stream = await asyncio.to_thread(self.open_stream)
                except SDXSError as exc:  # e.g. the host's session is stopping: the visitor stays in line
                    self.log(f"mlx-sdxs: a visitor's stream did not open: {exc}")
                    break
                if stream is None:
                    break
                if seat in self._seats:
                    for text in seat.kept:  # what the visitor chose while in line (bad ones are counted there)
                        stream.controls.handle_text(text)
                    seat.stream, seat.place = stream, 0
                    seat.changed.set()
                else:  # left while its stream was opening
                    await asyncio.to_thread(stream.close)
            for place, seat in enumerate([seat for seat in self._seats if seat.stream is None], start=1):
                if seat.place != place:
                    seat.place = place
                    seat.changed.set()

    def close_all(self) -> None:
        """The server stops: every visitor's stream closes now, from the caller's thread (closing is idempotent, so
        the event loop's own `leave` of each seat, if it still runs, finds them closed)."""
        for seat in list(self._seats):
            if seat.stream is not None:
                seat.stream.close()

