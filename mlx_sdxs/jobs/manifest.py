"""The out folder of a job and its manifest: one JSON line per finished output, appended after the output was
renamed into place. A rerun reads it to skip what is done; the two agree because an output and its line are
committed together with Ctrl-C and SIGTERM held back (`held_signals`), and a hard kill between them only
leaves an output without a line, which is made again."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from mlx_sdxs.errors import SDXSError

MANIFEST_NAME = "manifest.jsonl"
#: What an interrupted atomic write leaves behind (`imageio.atomic_write_bytes`, the video writer): `.NAME….partial`.
PARTIAL_GLOB = ".*.partial*"


def prepare_out_dir(out_dir: Path) -> Path:
    """Create `out_dir` if needed and check it can be written, before any model loads (a one-line error)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SDXSError(f"--out-dir {out_dir}: cannot create it ({exc.strerror or exc})") from None
    if not out_dir.is_dir():
        raise SDXSError(f"--out-dir {out_dir}: not a folder")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise SDXSError(f"--out-dir {out_dir}: not writable")
    return out_dir


def remove_partials(out_dir: Path) -> int:
    """Delete what interrupted writes left in `out_dir` (a hard kill skips their own clean-up)."""
    removed = 0
    for path in out_dir.glob(PARTIAL_GLOB):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


class Manifest:
    """`out_dir/manifest.jsonl`: file name → its record. Only the driver writes it, one whole line at a time, and
    holds a lock on it meanwhile (`close` releases it): a second run into the same folder is refused."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / MANIFEST_NAME
        self.entries: dict[str, dict[str, Any]] = {}
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as exc:
            raise SDXSError(f"{self.path}: cannot open it ({exc.strerror or exc})") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._read()
        except BaseException as exc:
            os.close(self._fd)
            if isinstance(exc, BlockingIOError):
                raise SDXSError(f"{out_dir}: another run is writing into this folder ({MANIFEST_NAME} is "
                                "locked); wait for it or use another --out-dir") from None
            raise

    def _read(self) -> None:
        with open(self._fd, "rb", closefd=False) as handle:
            data = handle.read()
        whole = 0  # bytes of whole lines: a last line cut by a crash is dropped from the file
        for number, line in enumerate(data.splitlines(keepends=True), 1):
            try:
                entry = json.loads(line)
                if not line.endswith(b"\n") or not isinstance(entry, dict) or "file" not in entry:
                    raise ValueError(line)
            except ValueError:
                if whole + len(line) == len(data):
                    break
                raise SDXSError(f"{self.path}, line {number}: not a manifest record; move the file away to "
                                "start over") from None
            self.entries[entry["file"]] = entry
            whole += len(line)
        if whole < len(data):
            os.ftruncate(self._fd, whole)

    def done(self, file: str, identity: dict[str, Any]) -> bool:
        """Whether `file` is finished: recorded and present. A record of other settings is an error naming them,
        so that a changed command never mixes two jobs in one folder."""
        entry = self.entries.get(file)
        if entry is None or not (self.path.parent / file).is_file():
            return False
        changed = {key: (entry.get(key), value) for key, value in identity.items() if entry.get(key) != value}
        if changed:
            what = ", ".join(f"{key} {old!r} → {new!r}" for key, (old, new) in sorted(changed.items()))
            raise SDXSError(f"{self.path}: {file} was made with other settings ({what}); use another --out-dir")
        return True

    def add(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            os.write(self._fd, line)  # one write of a whole line: a reader never sees half of one
            os.fsync(self._fd)
        except OSError as exc:
            raise SDXSError(f"{self.path}: cannot write ({exc.strerror or exc})") from None
        self.entries[entry["file"]] = entry

    def close(self) -> None:
        os.close(self._fd)  # (and with it the lock)


@contextmanager
def held_signals() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back for the duration (an output's rename and its manifest line), then deliver
    them; a no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda number, frame: received.append(number))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            signal.raise_signal(received[0])
