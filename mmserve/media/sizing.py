"""Qwen2.5-VL resize and frame-count rules (HF Qwen2VL processor + qwen-vl-utils) in plain Python: what the
router plans with and the decoder resizes to, without torch."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmserve.media.errors import MediaError

IMAGE_FACTOR = 28
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 16384 * 28 * 28
MAX_RATIO = 200
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
FRAME_FACTOR = 2
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(
    height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: float = MIN_PIXELS, max_pixels: float = MAX_PIXELS
) -> tuple[int, int]:
    """Target (h, w): multiples of factor, area within [min_pixels, max_pixels], aspect kept (HF Qwen2-VL rule)."""
    if height <= 0 or width <= 0:
        raise MediaError(f"media: invalid size {width}x{height}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise MediaError(f"media: aspect ratio {ratio:.1f} of {width}x{height} exceeds the limit of {MAX_RATIO}")
    # Same arithmetic as transformers' smart_resize (it differs from qwen-vl-utils only for sides < factor/2).
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_nframes(
    total_frames: int,
    video_fps: float,
    *,
    fps: float = FPS,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int = FPS_MAX_FRAMES,
) -> int:
    """Number of frames to sample (qwen-vl-utils smart_nframes, fps mode)."""
    if not video_fps or video_fps <= 0 or not math.isfinite(video_fps):
        raise MediaError(f"video: invalid frame rate {video_fps}")
    if total_frames < FRAME_FACTOR:
        raise MediaError(f"video: cannot sample from a clip of only {total_frames} frame(s); "
                         f"at least {FRAME_FACTOR} are needed")
    min_frames = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    max_frames = math.floor(min(max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
    nframes = total_frames / video_fps * fps
    nframes = min(min(max(nframes, min_frames), max_frames), total_frames)
    nframes = math.floor(nframes / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= nframes <= total_frames:
        raise MediaError(
            f"video: cannot sample {nframes} frames from a clip of {total_frames} frames "
            f"(need between {FRAME_FACTOR} and {total_frames})"
        )
    return int(nframes)


def linspace_indices(total_frames: int, num_frames: int) -> tuple[int, ...]:
    """round(torch.linspace(0, total_frames - 1, num_frames)) in float32 as torch computes it (qwen-vl-utils'
    sampling), without torch: the halves are stepped from either end."""
    if num_frames == 1:
        return (0,)
    end = np.float32(total_frames - 1)
    step = end / np.float32(num_frames - 1)
    i = np.arange(num_frames)
    values = np.where(i < num_frames // 2, i.astype(np.float32) * step,
                      end - (num_frames - 1 - i).astype(np.float32) * step).astype(np.float32)
    return tuple(int(x) for x in np.round(values))


def sample_frame_indices(
    total_frames: int,
    video_fps: float,
    *,
    fps: float = FPS,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int = FPS_MAX_FRAMES,
) -> tuple[list[int], float]:
    """Frame indices to keep and the resulting sample fps (qwen-vl-utils linspace rule)."""
    nframes = smart_nframes(total_frames, video_fps, fps=fps, min_frames=min_frames, max_frames=max_frames)
    sample_fps = nframes / max(total_frames, 1e-6) * video_fps
    return list(linspace_indices(total_frames, nframes)), sample_fps


def video_max_pixels(
    nframes: int,
    *,
    min_pixels: float = VIDEO_MIN_PIXELS,
    max_pixels: float = VIDEO_MAX_PIXELS,
    total_pixels: float = VIDEO_TOTAL_PIXELS,
) -> float:
    """Per-frame pixel budget of qwen-vl-utils fetch_video (kept fractional, as it is there)."""
    budget = max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    return min(max_pixels, budget)


@dataclass(frozen=True)
class ImageProcessing:
    """Qwen2-VL image-processor settings (preprocessor_config.json)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS

    @property
    def factor(self) -> int:
        """Spatial alignment of resized images (patch_size * merge_size)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ImageProcessing:
        """Read settings from a model directory's preprocessor_config.json (or processor_config.json)."""
        model_dir = Path(model_dir)
        path = model_dir / "preprocessor_config.json"
        if path.is_file():
            cfg = json.loads(path.read_text())
        else:
            fallback = model_dir / "processor_config.json"
            if not fallback.is_file():
                raise FileNotFoundError(f"no preprocessor_config.json or processor_config.json in {model_dir}")
            cfg = json.loads(fallback.read_text())
            cfg = cfg.get("image_processor", cfg)
        size = cfg.get("size") or {}
        defaults = cls()
        # As in the HF processor, explicit min_pixels/max_pixels win over size.
        min_pixels = cfg.get("min_pixels") or size.get("shortest_edge") or defaults.min_pixels
        max_pixels = cfg.get("max_pixels") or size.get("longest_edge") or defaults.max_pixels
        return cls(
            patch_size=int(cfg.get("patch_size", defaults.patch_size)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", defaults.temporal_patch_size)),
            merge_size=int(cfg.get("merge_size", defaults.merge_size)),
            image_mean=tuple(float(x) for x in cfg.get("image_mean", defaults.image_mean)),
            image_std=tuple(float(x) for x in cfg.get("image_std", defaults.image_std)),
            rescale_factor=float(cfg.get("rescale_factor", defaults.rescale_factor)),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
        )
