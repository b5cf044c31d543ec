"""Qwen2.5-VL preprocessing: resize/frame-sampling rules and pixel_values parity with the HF processor."""

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from mmserve.media import MediaError, resize
from mmserve.media.image import decode_image
from mmserve.media.preprocess import (
    MAX_PIXELS,
    MIN_PIXELS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VIDEO_TOTAL_PIXELS,
    ImageProcessing,
    resize_frames,
    sample_frame_indices,
    smart_nframes,
    smart_resize,
    to_pixel_values,
    video_max_pixels,
)
from mmserve.media.samples import make_image


@pytest.mark.parametrize(
    ("hw", "bounds", "expected"),
    [
        ((48, 64), (MIN_PIXELS, MAX_PIXELS), (56, 56)),  # round 1.71, 2.29 -> 2, 2
        ((480, 640), (MIN_PIXELS, MAX_PIXELS), (476, 644)),  # 17.1 -> 17, 22.9 -> 23
        ((1000, 2000), (MIN_PIXELS, 28 * 28 * 100), (196, 392)),  # beta=5.05: floor(7.07), floor(14.1)
        ((10, 20), (MIN_PIXELS, MAX_PIXELS), (56, 84)),  # beta=3.96: ceil(1.41), ceil(2.83)
        ((224, 336), (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS), (280, 392)),  # 75264 < 100352: scale up
        # Ratio 200 is allowed. HF rounds h to 0, so it takes the upscale branch (qwen-vl-utils: 28x2016).
        ((10, 2000), (MIN_PIXELS, MAX_PIXELS), (28, 812)),
    ],
)
def test_smart_resize_hand_worked(hw, bounds, expected):
    assert smart_resize(*hw, 28, *bounds) == expected


def test_smart_resize_matches_transformers():
    rng = random.Random(0)
    for _ in range(2000):
        h, w = rng.randint(14, 5000), rng.randint(14, 5000)
        if max(h, w) / min(h, w) > 200:
            continue
        lo = rng.choice([MIN_PIXELS, VIDEO_MIN_PIXELS, 28 * 28 * 16])
        hi = rng.choice([MAX_PIXELS, VIDEO_MAX_PIXELS, 28 * 28 * 64, video_max_pixels(rng.randint(2, 768))])
        assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(MediaError, match="aspect ratio"):
        smart_resize(10, 2001)


@pytest.mark.parametrize(
    ("total", "video_fps", "kwargs", "expected"),
    [
        (60, 30.0, {}, 4),  # 2 s at 2 fps
        (300, 30.0, {}, 20),  # 10 s at 2 fps
        (61, 29.97, {}, 4),  # 4.07 floored to a multiple of 2
        (5, 30.0, {}, 4),  # raised to min_frames
        (3, 30.0, {}, 2),  # capped by floor(total / 2) * 2
        (10000, 30.0, {}, 666),  # 666.7 floored
        (100000, 30.0, {}, 768),  # max_frames
        (10000, 30.0, {"max_frames": 101}, 100),
        (300, 30.0, {"fps": 1.0, "min_frames": 3}, 10),
        (20, 30.0, {"fps": 1.0, "min_frames": 3}, 4),  # min_frames 3 -> ceil to 4
    ],
)
def test_smart_nframes(total, video_fps, kwargs, expected):
    assert smart_nframes(total, video_fps, **kwargs) == expected


def test_smart_nframes_rejects_single_frame_and_bad_fps():
    with pytest.raises(MediaError, match="cannot sample"):
        smart_nframes(1, 30.0)
    with pytest.raises(MediaError, match="frame rate"):
        smart_nframes(100, 0.0)


@pytest.mark.parametrize(
    ("total", "video_fps", "indices", "sample_fps"),
    [
        (60, 30.0, [0, 20, 39, 59], 2.0),  # linspace 0, 19.67, 39.33, 59
        (5, 30.0, [0, 1, 3, 4], 24.0),  # 0, 1.33, 2.67, 4
        (6, 25.0, [0, 2, 3, 5], 25.0 * 4 / 6),
        (3, 30.0, [0, 2], 20.0),
    ],
)
def test_sample_frame_indices(total, video_fps, indices, sample_fps):
    got, fps = sample_frame_indices(total, video_fps)
    assert got == indices
    assert fps == pytest.approx(sample_fps)
    assert got == torch.linspace(0, total - 1, len(indices)).round().long().tolist()


def test_video_max_pixels():
    assert video_max_pixels(4) == VIDEO_MAX_PIXELS
    assert video_max_pixels(768) == VIDEO_TOTAL_PIXELS / 768 * 2
    assert video_max_pixels(100, total_pixels=1_000_000) == int(VIDEO_MIN_PIXELS * 1.05)
    assert video_max_pixels(4, max_pixels=28 * 28 * 200) == 28 * 28 * 200


def test_resize_frames_identity_and_constant():
    frames = torch.randint(0, 256, (3, 56, 84, 3), dtype=torch.uint8)
    assert resize_frames(frames, 56, 84) is frames
    const = torch.full((2, 50, 70, 3), 173, dtype=torch.uint8)
    for h, w in [(28, 56), (112, 140), (50, 84)]:
        out = resize_frames(const, h, w)
        assert out.shape == (2, h, w, 3) and out.dtype == torch.uint8
        assert torch.all(out == 173)


def test_resize_frames_batch_equals_per_frame_and_the_workers_resize():
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (20, 45, 61, 3), dtype=torch.uint8, generator=gen)
    batch = resize_frames(frames, 84, 112)
    single = torch.cat([resize_frames(frames[i:i + 1], 84, 112) for i in range(20)])
    assert torch.equal(batch, single)
    # On the CPU every path resizes as the decoder's workers do (tests/unit/test_resize.py: against torch's).
    assert torch.equal(batch, torch.from_numpy(resize.resize_frames(frames.numpy(), 84, 112)))


IMAGE_CASES = [
    (64, 48, "PNG", "RGB"),
    (640, 480, "JPEG", "RGB"),
    (37, 300, "PNG", "RGBA"),
    (300, 300, "WEBP", "RGBA"),
    (200, 30, "GIF", "RGB"),
    (64, 48, "GIF", "RGBA"),  # palette with a transparency index
    (90, 60, "PNG", "P"),
    (99, 71, "PNG", "LA"),
    (900, 300, "JPEG", "L"),
    (1000, 20, "PNG", "RGB"),
    (13, 13, "PNG", "RGB"),  # upscaled to min_pixels
    (84, 56, "PNG", "RGB"),  # already aligned: no resize
]


@pytest.mark.parametrize(("width", "height", "fmt", "mode"), IMAGE_CASES)
@pytest.mark.parametrize("max_pixels", [MAX_PIXELS, 28 * 28 * 40])
def test_pixel_values_match_hf_processor(width, height, fmt, mode, max_pixels):
    data = make_image(width=width, height=height, fmt=fmt, mode=mode, seed=width)
    hf = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=max_pixels)
    ref = hf(Image.open(io.BytesIO(data)), return_tensors="np")
    frames = decode_image(data, min_pixels=MIN_PIXELS, max_pixels=max_pixels)
    pixel_values, grid = to_pixel_values(torch.from_numpy(frames))
    assert [list(grid)] == ref["image_grid_thw"].tolist()
    assert pixel_values.dtype == torch.float32
    assert pixel_values.shape == ref["pixel_values"].shape
    assert np.abs(pixel_values.numpy() - ref["pixel_values"]).max() <= 1e-6


def _reference_patchify(frames, ps=14, tps=2, ms=2, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
    """Straight numpy transcription of HF's rescale/normalize/patchify, for multi-frame input."""
    x = frames.numpy().transpose(0, 3, 1, 2)
    if x.shape[0] % tps:
        x = np.concatenate([x, np.repeat(x[-1:], tps - x.shape[0] % tps, axis=0)])
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None]
    t, c, h, w = x.shape
    x = x.reshape(t // tps, tps, c, h // ps // ms, ms, ps, w // ps // ms, ms, ps)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t // tps * (h // ps) * (w // ps), c * tps * ps * ps)


@pytest.mark.parametrize("t", [1, 3, 4])
def test_to_pixel_values_video_layout(t):
    gen = torch.Generator().manual_seed(t)
    frames = torch.randint(0, 256, (t, 56, 84, 3), dtype=torch.uint8, generator=gen)
    pixel_values, grid = to_pixel_values(frames)
    assert grid == ((t + 1) // 2, 4, 6)
    assert np.array_equal(pixel_values.numpy(), _reference_patchify(frames))
    if t == 1:  # an image is duplicated along the temporal patch
        blocks = pixel_values.view(-1, 3, 2, 14 * 14)
        assert torch.equal(blocks[:, :, 0], blocks[:, :, 1])


def test_to_pixel_values_rejects_unaligned_size():
    with pytest.raises(ValueError, match="multiple of 28"):
        to_pixel_values(torch.zeros((1, 56, 70, 3), dtype=torch.uint8))


def test_image_processing_from_pretrained(tmp_path):
    legacy = {
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
        "image_processor_type": "Qwen2VLImageProcessor",
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    cfg = ImageProcessing.from_pretrained(tmp_path)
    assert cfg == ImageProcessing()
    assert cfg.factor == 28 and cfg.rescale_factor == 1 / 255

    sized = {"size": {"shortest_edge": 1000, "longest_edge": 200000}, "patch_size": 16, "rescale_factor": 0.5}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(sized))
    cfg = ImageProcessing.from_pretrained(tmp_path)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.patch_size, cfg.rescale_factor) == (1000, 200000, 16, 0.5)
    with pytest.raises(FileNotFoundError):
        ImageProcessing.from_pretrained(tmp_path / "missing")
