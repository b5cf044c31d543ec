"""Bicubic antialiased resize of uint8 RGB frames with Pillow, without torch: what the decoder's workers run.

torchvision resizes a video's uint8 frames as float (torch's interpolate, bicubic, antialiased: Keys' cubic with
a = -0.5, its support widened by the scale when shrinking), then clamps and rounds. Pillow's float ("F") images are
resampled with the same filter, window and normalised weights, in double precision where torch sums in float32:
the two agree but for ±1 on values that lie within float32's error of a half (at most a few in a thousand,
bounded in tests/unit/test_resize.py).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def _resize_plane(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    image = Image.fromarray(plane)  # float32 [H,W]: mode "F"
    return np.asarray(image.resize((width, height), resample=Image.Resampling.BICUBIC))


def resize_frame(rgb: np.ndarray, height: int, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [H,W,3] → uint8 [height,width,3] (into out when given); the frame itself when the size is unchanged."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected uint8 [H,W,3] frame, got {rgb.dtype} {rgb.shape}")
    if out is None:
        out = np.empty((height, width, 3), dtype=np.uint8)
    if rgb.shape[:2] == (height, width):
        out[...] = rgb
        return out
    planes = np.empty((3, height, width), dtype=np.float32)
    for c in range(3):
        planes[c] = _resize_plane(rgb[..., c].astype(np.float32), height, width)
    # torchvision: clamp the bicubic overshoot, round half to even, cast back to uint8.
    np.clip(planes, 0, 255, out=planes)
    np.round(planes, out=planes)
    out[...] = planes.transpose(1, 2, 0)
    return out


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [T,H,W,3] → uint8 [T,height,width,3]; the frames themselves when the size is unchanged."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 [T,H,W,3] frames, got {frames.dtype} {frames.shape}")
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((frames.shape[0], height, width, 3), dtype=np.uint8)
    for frame, into in zip(frames, out):
        resize_frame(frame, height, width, out=into)
    return out
