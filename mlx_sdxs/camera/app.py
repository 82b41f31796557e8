"""`mlx-sdxs camera` (and the studio's session): a `Session` from parsed flags, run under Ctrl-C and SIGTERM
alike — threads joined, recordings finalised, stats printed — and an exit status."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from mlx_sdxs.camera.session import BackendFactory, Closeable, Session
from mlx_sdxs.errors import SDXSError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised on the main thread like Ctrl-C so that every output is finalised on the way out."""


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into `Terminated` on the main thread for the duration (a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop: finalising must not be cut short again
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_camera(args: argparse.Namespace, make_backend: BackendFactory, *, studio: bool = False,
               attach: Sequence[Callable[[Session], Closeable]] = ()) -> int:
    """One session from parsed flags; returns the exit status (0, 1 on an error, 130 on Ctrl-C/SIGTERM).
    See `Session.open` for `studio` and `attach`."""
    log = sys.stderr
    session = None
    status = 0
    with stop_on_sigterm():
        try:
            session = Session.open(args, make_backend, studio=studio, attach=attach, log=log)
            session.run()
        except KeyboardInterrupt as exc:
            status = 130
            print(f"mlx-sdxs: {'terminated (SIGTERM)' if isinstance(exc, Terminated) else 'interrupted'}", file=log)
        except SDXSError as exc:
            status = 1
            print(f"mlx-sdxs: error: {exc}", file=log)
        finally:
            if session is not None:
                status = session.close(status)
    if session is not None and session.ran:
        print(session.control.stats.summary())
        for number, side in enumerate(session.sides, start=2):
            print(f"stream {number} ({side.source.name}):\n{side.control.stats.summary()}")
            if side.error is not None:
                status = status or 1
                print(f"mlx-sdxs: error in stream {number}: {side.error}", file=log)
    return status
