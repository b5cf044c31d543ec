"""The decoder's Pillow resize against torch's (what torchvision runs on a video's uint8 frames): equal but for ±1
where float32 rounding puts a value on the other side of a half."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmserve.media.resize import resize_frame, resize_frames


def torchvision_resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision's resize of uint8 frames (bicubic, antialiased): interpolate as float, clamp, round."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    out = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", align_corners=False,
                                          antialias=True)
    return out.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def noise(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (2, height, width, 3), dtype=np.uint8)


def scene(height: int, width: int) -> np.ndarray:
    """Smooth gradients and hard edges, as in a frame of video."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    planes = [127 + 120 * np.sin(x / 17 + y / 29), 127 + 120 * np.cos(x / 7), np.where((x // 40 + y // 40) % 2, 230, 20)]
    return np.stack(planes, -1).astype(np.uint8)[None]


@pytest.mark.parametrize(("size", "to"), [
    ((360, 640), (112, 196)),   # a 640x360 clip shrunk 3.3x (most video)
    ((240, 320), (154, 210)),   # shrunk 1.5x
    ((50, 75), (140, 210)),     # enlarged to the minimum pixels
    ((360, 640), (364, 644)),   # enlarged to the next multiple of 28
    ((333, 517), (448, 448)),   # both ways (an InternVL tile)
])
@pytest.mark.parametrize("content", ["noise", "scene"])
def test_equal_to_torchvision_but_for_rounding(size, to, content):
    frames = noise(sum(size), *size) if content == "noise" else scene(*size)
    ours, theirs = resize_frames(frames, *to), torchvision_resize(frames, *to)
    assert ours.shape == theirs.shape == (frames.shape[0], *to, 3) and ours.dtype == np.uint8
    diff = np.abs(ours.astype(np.int16) - theirs)
    assert diff.max() <= 1
    assert (diff > 0).mean() <= 0.005, f"{(diff > 0).mean():.4%} of values differ"
    if content == "noise" and to[0] > 2 * size[0]:
        assert ours.min() == 0 and ours.max() == 255  # the bicubic overshoot is clamped, not wrapped


def test_a_nearby_filter_is_told_apart():
    """The bound above catches another filter: bicubic without antialiasing differs by far more."""
    frames = scene(360, 640)
    ours = resize_frames(frames, 112, 196)
    plain = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(112, 196),
                                            mode="bicubic", align_corners=False, antialias=False)
    plain = plain.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours.astype(np.int16) - plain).max() > 1


def test_same_size_batches_and_output_buffers():
    frames = noise(1, 45, 61)
    assert resize_frames(frames, 45, 61) is frames
    batch = resize_frames(frames, 84, 112)
    assert np.array_equal(batch, np.stack([resize_frame(f, 84, 112) for f in frames]))
    into = np.zeros((3, 84, 112, 3), np.uint8)
    slot = into[1]
    assert resize_frame(frames[0], 84, 112, out=slot) is slot
    assert np.array_equal(into[1], batch[0]) and not into[0].any() and not into[2].any()
    assert np.array_equal(resize_frame(frames[0], 45, 61), frames[0])
    with pytest.raises(ValueError, match="uint8"):
        resize_frames(frames.astype(np.float32), 84, 112)
