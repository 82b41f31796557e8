"""The newest-item hand-over that every stage, viewer and pushed-in source uses.

A producer `put`s, replacing the item; a consumer asks for anything newer than the sequence number it
holds, so a slow consumer skips to the present instead of working through a backlog. `take_newer` is the
single consumer's call (an item replaced before anyone took it counts as `dropped`); `wait_newer` and
`wait_newer_async` serve any number of consumers (threads, or coroutines on an asyncio loop). `close`
means no more puts: waiters wake, and what is there can still be read. Several slots may share one
`threading.Condition`, so one thread can wait on all of them at once.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class LatestSlot(Generic[T]):
    def __init__(self, condition: threading.Condition | None = None) -> None:
        self._cond = condition or threading.Condition()
        self._item: T | None = None
        self._seq = 0
        self._taken_seq = 0
        self._closed = False
        self._async_waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.dropped = 0

    def put(self, item: T) -> int:
        with self._cond:
            if self._seq > self._taken_seq:
                self.dropped += 1
            self._seq += 1
            self._item = item
            self._cond.notify_all()
            waiters = list(self._async_waiters)
        _wake(waiters)
        return self._seq

    def wait_newer(self, after_seq: int, timeout: float | None = None,
                   wake_if: Callable[[], bool] | None = None) -> tuple[int, T] | None:
        """(seq, item) of the newest item with seq > after_seq, waiting up to `timeout` (None: forever); None on
        timeout, when closed and nothing newer is there, or when `wake_if()` turned true (checked whenever the
        condition is notified: see `notify`)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._seq > after_seq or self._closed or (wake_if and wake_if()),
                                       timeout):
                return None
            return (self._seq, self._item) if self._seq > after_seq else None

    def take_newer(self, after_seq: int, timeout: float | None = None,
                   wake_if: Callable[[], bool] | None = None) -> tuple[int, T] | None:
        """`wait_newer` for the slot's one consumer: what it returns no longer counts as dropped."""
        with self._cond:
            taken = self.wait_newer(after_seq, timeout, wake_if)
            if taken is not None:
                self._taken_seq = taken[0]
            return taken

    async def wait_newer_async(self, after_seq: int, timeout: float) -> tuple[int, T] | None:
        """`wait_newer` for a coroutine: it waits on an asyncio event that `put` and `close` set from their thread."""
        if self._seq <= after_seq and not self._closed:
            waiter = (asyncio.get_running_loop(), asyncio.Event())
            with self._cond:
                self._async_waiters.add(waiter)
            try:
                if self._seq <= after_seq and not self._closed:
                    await asyncio.wait_for(waiter[1].wait(), timeout)
            except asyncio.TimeoutError:
                return None
            finally:
                with self._cond:
                    self._async_waiters.discard(waiter)
        with self._cond:
            return (self._seq, self._item) if self._seq > after_seq else None

    def latest(self) -> T | None:
        return self._item

    def notify(self) -> None:
        """Wake the threads waiting on this slot's condition without a new item (they re-check what they wait for)."""
        with self._cond:
            self._cond.notify_all()

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def condition(self) -> threading.Condition:
        return self._cond

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            waiters = list(self._async_waiters)
        _wake(waiters)

    @property
    def closed(self) -> bool:
        return self._closed


def _wake(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
    for loop, event in waiters:
        try:
            loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # that viewer's event loop has closed: nobody waits there any more
            pass
