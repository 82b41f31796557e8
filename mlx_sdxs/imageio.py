"""Reading any image a user hands us as RGB uint8, and writing outputs atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

from mlx_sdxs.errors import ImageError, SDXSError

#: Larger inputs are refused rather than risking a multi-GB decode (8192×8192 is still accepted).
MAX_PIXELS = 8192 * 8192
MIN_SIDE = 8


def read_image(path: str | Path) -> np.ndarray:
    """Decode a file as RGB uint8 (H, W, 3): grayscale, RGBA (alpha dropped) and 16-bit inputs included."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if data.size == 0:
        raise ImageError(f"{path}: empty file")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ImageError(f"{path}: not a decodable image (PNG, JPEG, WebP, BMP, TIFF …)")
    height, width = image.shape[:2]
    if height * width > MAX_PIXELS:
        raise ImageError(f"{path}: {width}×{height} exceeds the {MAX_PIXELS:,}-pixel limit (8192×8192)")
    if min(height, width) < MIN_SIDE:
        raise ImageError(f"{path}: {width}×{height} is too small (each side must be ≥ {MIN_SIDE} px)")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def write_image(path: str | Path, rgb: np.ndarray) -> Path:
    """Encode by extension and write via a temp file + rename, so a failure never leaves a partial file."""
    path = Path(path)
    ok, encoded = cv2.imencode(path.suffix or ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ImageError(f"{path}: cannot encode an image with extension {path.suffix!r}")
    atomic_write_bytes(path, encoded.tobytes())
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise SDXSError(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise
