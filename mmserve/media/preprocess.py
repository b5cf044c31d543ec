"""Qwen2.5-VL resize and patchify (HF Qwen2VL processor + qwen-vl-utils) on tensors; the sizing and frame-sampling
rules, which need no torch, live in sizing.py and are re-exported here."""

from __future__ import annotations

import torch

from mmserve.media import resize
from mmserve.media.errors import MediaError  # noqa: F401  (re-exported)
from mmserve.media.sizing import (  # noqa: F401  (re-exported)
    IMAGE_FACTOR,
    MIN_PIXELS,
    MAX_PIXELS,
    MAX_RATIO,
    VIDEO_MIN_PIXELS,
    VIDEO_MAX_PIXELS,
    FRAME_FACTOR,
    FPS,
    FPS_MIN_FRAMES,
    FPS_MAX_FRAMES,
    VIDEO_TOTAL_PIXELS,
    smart_resize,
    smart_nframes,
    ImageProcessing,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    video_max_pixels,
    sample_frame_indices,
)

# Frames resized per interpolate call; bounds the float32 working set for long videos.
_RESIZE_CHUNK = 16
_PATCH_ROWS_CHUNK = 4096


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic antialiased resize of uint8 [T,H,W,3] frames, as torchvision resize does on uint8 tensors: on the
    CPU with Pillow (mmserve.media.resize, what the decoder's workers run, so every CPU path gives the same
    pixels), on a GPU with torch's interpolate."""
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 [T,H,W,3] frames, got {frames.dtype} {tuple(frames.shape)}")
    if frames.shape[1] == height and frames.shape[2] == width:
        return frames
    if frames.device.type == "cpu":
        return torch.from_numpy(resize.resize_frames(frames.numpy(), height, width))
    out = torch.empty((frames.shape[0], height, width, 3), dtype=torch.uint8, device=frames.device)
    for start in range(0, frames.shape[0], _RESIZE_CHUNK):
        # permute (no copy) then .float() keeps the channels-last strides qwen-vl-utils' TCHW tensor has.
        chunk = frames[start:start + _RESIZE_CHUNK].permute(0, 3, 1, 2).float()
        resized = torch.nn.functional.interpolate(
            chunk, size=(height, width), mode="bicubic", align_corners=False, antialias=True
        )
        # torchvision: clamp bicubic overshoot, round, cast back to uint8.
        out[start:start + _RESIZE_CHUNK] = resized.clamp_(0, 255).round_().to(torch.uint8).permute(0, 2, 3, 1)
    return out


def _normalize_lut(image_mean, image_std, rescale_factor: float) -> torch.Tensor:
    """[3,256] float32 table: HF rescale (float64 multiply, float32 cast) then float32 normalize."""
    levels = (torch.arange(256, dtype=torch.float64) * rescale_factor).to(torch.float32)
    mean = torch.tensor(image_mean, dtype=torch.float32).view(3, 1)
    std = torch.tensor(image_std, dtype=torch.float32).view(3, 1)
    return (levels.view(1, 256) - mean) / std


def to_pixel_values(
    frames: torch.Tensor,
    *,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    image_mean=OPENAI_CLIP_MEAN,
    image_std=OPENAI_CLIP_STD,
    rescale_factor: float = 1 / 255,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Rescale, normalize and patchify uint8 [T,H,W,3] frames into Qwen2-VL pixel_values and grid_thw."""
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"expected uint8 [T,H,W,3] frames, got {frames.dtype} {tuple(frames.shape)}")
    t, h, w, c = frames.shape
    unit = patch_size * merge_size
    if h % unit or w % unit:
        raise ValueError(f"frame size {w}x{h} is not a multiple of {unit}")
    pad = (-t) % temporal_patch_size
    if pad:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)], dim=0)
    grid_t, grid_h, grid_w = frames.shape[0] // temporal_patch_size, h // patch_size, w // patch_size
    patch_elems = temporal_patch_size * patch_size * patch_size
    rows = grid_t * grid_h * grid_w
    # Patchify the uint8 frames first (1-byte copy), then map bytes to normalized floats through a table.
    patches = frames.permute(0, 3, 1, 2).reshape(
        grid_t, temporal_patch_size, c,
        grid_h // merge_size, merge_size, patch_size,
        grid_w // merge_size, merge_size, patch_size,
    ).permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(rows, c, patch_elems)
    lut = _normalize_lut(image_mean, image_std, rescale_factor).flatten().to(frames.device)
    channel_offset = (torch.arange(c, dtype=torch.int32, device=frames.device) * 256).view(1, c, 1)
    out = torch.empty((rows, c, patch_elems), dtype=torch.float32, device=frames.device)
    for start in range(0, rows, _PATCH_ROWS_CHUNK):
        # Chunks bound the int32 index tensor; index_select is far faster than advanced indexing here.
        block = patches[start:start + _PATCH_ROWS_CHUNK]
        index = (block.to(torch.int32) + channel_offset).view(-1)
        out[start:start + _PATCH_ROWS_CHUNK] = lut.index_select(0, index).view(block.shape)
    out = out.view(rows, c * patch_elems)
    return out, (grid_t, grid_h, grid_w)
