"""Reading any image a user hands us as RGB uint8, and writing outputs atomically."""

from __future__ import annotations

import os
import struct
import secrets
from pathlib import Path

import cv2
import numpy as np

from mlx_sdxs.errors import ImageError, SDXSError
from mlx_sdxs.frames import MIN_SIDE

#: Larger inputs are refused rather than risking a multi-GB decode (8192×8192 is still accepted).
MAX_PIXELS = 8192 * 8192


def read_image(path: str | Path) -> np.ndarray:
    """Decode a file as RGB uint8 (H, W, 3): grayscale, RGBA (alpha dropped) and 16-bit inputs included."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if data.size == 0:
        raise ImageError(f"{path}: empty file")
    declared = header_size(data[:65536].tobytes())
    if declared is not None:
        _check_size(path, *declared)  # before decoding: an oversized file never allocates its pixels
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ImageError(f"{path}: not a decodable image (PNG, JPEG, WebP, BMP, TIFF …)")
    _check_size(path, image.shape[1], image.shape[0])
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _check_size(path: Path, width: int, height: int) -> None:
    if height * width > MAX_PIXELS:
        raise ImageError(f"{path}: {width}×{height} exceeds the {MAX_PIXELS:,}-pixel limit (8192×8192)")
    if min(height, width) < MIN_SIDE:
        raise ImageError(f"{path}: {width}×{height} is too small (each side must be ≥ {MIN_SIDE} px)")


def header_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header without decoding; None for other formats or odd headers."""
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR" and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    if head.startswith(b"\xff\xd8"):
        offset = 2
        while offset + 9 <= len(head) and head[offset] == 0xFF:
            marker, length = head[offset + 1], struct.unpack(">H", head[offset + 2:offset + 4])[0]
            # SOF0–SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", head[offset + 5:offset + 9])
                return width, height
            offset += 2 + length
    return None


def write_image(path: str | Path, rgb: np.ndarray) -> Path:
    """Encode by extension and write via a temp file + rename, so a failure never leaves a partial file."""
    path = Path(path)
    atomic_write_bytes(path, encode_image(path, rgb))
    return path


def encode_image(path: str | Path, rgb: np.ndarray) -> bytes:
    """RGB uint8 → the bytes of the format `path`'s extension names (PNG without one)."""
    path = Path(path)
    try:
        ok, encoded = cv2.imencode(path.suffix or ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    except cv2.error:  # OpenCV raises, rather than returning False, for an extension it has no encoder for
        ok = False
    if not ok:
        raise ImageError(f"{path}: cannot encode an image with extension {path.suffix!r}")
    return encoded.tobytes()


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Write beside the target, then rename; the file gets `mode` less the umask (by default the usual mode, which
    mkstemp's 0600 would not give; a private key asks for 0600)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        candidate = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        tmp = candidate
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise SDXSError(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise
