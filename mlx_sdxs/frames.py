"""Frames in and out of the models: crop to the render aspect, resize, colour order, [-1, 1] ↔ uint8.

numpy only at import; OpenCV is loaded on the first resize, so `mlx_sdxs.pipeline` imports without it.
Sizes are (width, height), as OpenCV and the `--render-size WxH` flag write them.
"""

from __future__ import annotations

import numpy as np

from mlx_sdxs.errors import ImageError

Size = tuple[int, int]
#: The smallest side of any frame or image mlx-sdxs reads (camera frames, video, images, the studio's
#: uploads): smaller is a broken device or a mistake, not a picture to stylise.
MIN_SIDE = 16


def as_size(size: int | Size) -> Size:
    """An int means a square; a (width, height) pair is returned as a tuple of ints."""
    if isinstance(size, int):
        return size, size
    width, height = size
    return int(width), int(height)


def check_frame(frame: np.ndarray, what: str = "frame") -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 \
            or min(frame.shape[:2]) < MIN_SIDE:
        raise ImageError(f"expected a uint8 H×W×3 {what} of at least {MIN_SIDE}×{MIN_SIDE}, got "
                         f"{getattr(frame, 'dtype', type(frame).__name__)} {getattr(frame, 'shape', '')}")
    return frame


def fit(frame: np.ndarray, size: int | Size) -> np.ndarray:
    """Centre-crop `frame` to the aspect of `size`, then resize to it (INTER_AREA shrinking, INTER_LINEAR growing)."""
    width, height = as_size(size)
    check_frame(frame)
    rows, cols = frame.shape[:2]
    # The largest centred window of the target aspect: crop whichever side is too long.
    if cols * height > rows * width:
        crop_w, crop_h = max(1, round(rows * width / height)), rows
    else:
        crop_w, crop_h = cols, max(1, round(cols * height / width))
    top, left = (rows - crop_h) // 2, (cols - crop_w) // 2
    window = frame[top: top + crop_h, left: left + crop_w]
    if (crop_w, crop_h) == (width, height):
        return window
    import cv2

    interpolation = cv2.INTER_AREA if crop_w > width else cv2.INTER_LINEAR
    return cv2.resize(window, (width, height), interpolation=interpolation)


def as_model_input(frame: np.ndarray, bgr: bool = True) -> np.ndarray:
    """uint8 frame → float32 RGB in [-1, 1], NHWC batch of one."""
    rgb = frame[..., ::-1] if bgr else frame
    return (rgb.astype(np.float32) * (2.0 / 255.0) - 1.0)[None]


def to_model_input(frame: np.ndarray, size: int | Size, bgr: bool = True) -> np.ndarray:
    """uint8 frame → float32 RGB in [-1, 1], NHWC batch of one, fitted to `size`."""
    return as_model_input(fit(frame, size), bgr)


def from_model_output(image: np.ndarray, bgr: bool = True) -> np.ndarray:
    """Float RGB in [-1, 1], (H, W, 3) or a batch of one → uint8 (rounded like diffusers, clipped)."""
    image = np.asarray(image, dtype=np.float32)
    image = image[0] if image.ndim == 4 else image
    out = np.clip((image + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out[..., ::-1]) if bgr else out


#: How a frame becomes a ControlNet's input (white strokes on black, as the SDXS Sketch model was trained):
#: "edges" of a photo or camera frame, a "sketch" (dark strokes on light paper, inverted as IDKiro/sdxs's
#: sketch demo does), or "lines" already light on dark (taken as they are).
CONTROL_MODES = ("edges", "sketch", "lines")


def control_image(frame: np.ndarray, mode: str) -> np.ndarray:
    """`frame` (uint8, 3 channels, either order) as the ControlNet's input in the same layout."""
    if mode == "lines":
        return frame
    if mode == "sketch":
        return 255 - frame
    if mode != "edges":
        raise ImageError(f"control mode {mode!r} is not one of {', '.join(CONTROL_MODES)}")
    import cv2

    grey = cv2.GaussianBlur(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), (5, 5), 0)
    median = float(np.median(grey))  # thresholds that follow the picture's exposure
    edges = cv2.Canny(grey, max(0.0, 0.66 * median), min(255.0, 1.33 * median) + 1)
    # Sketch-weight strokes: ~5 px at 512, as a pen on the demo's canvas, not Canny's one-pixel lines.
    side = 2 * max(1, round(min(frame.shape[:2]) / 256)) + 1
    edges = cv2.dilate(edges, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side)))
    return cv2.cvtColor(edges, cv2.COLOR_GRAY2BGR)
