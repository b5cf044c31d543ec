"""Qwen3-VL media preprocessing, vision-tower loading and encoding (merger output plus DeepStack features)."""

from __future__ import annotations

import torch
from transformers import AutoConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

from mmserve.media.preprocess import resize_frames, to_pixel_values
from mmserve.models.family import EncodedItem, MediaItem
from mmserve.models.pixels import normalize_fused, pil_resize
from mmserve.models.weights import load_part

# Hub checkpoints keep the tower under model.visual (older exports: visual).
VISION_KEYS = r"^(model\.)?visual\."


def _pixels(family, frames: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    s = family.settings
    return to_pixel_values(frames, patch_size=s.patch_size, temporal_patch_size=s.temporal_patch_size,
                           merge_size=s.merge_size, image_mean=s.image_mean, image_std=s.image_std)


def preprocess_image(family, image) -> tuple[torch.Tensor, MediaItem]:
    """PIL bicubic resize to the plan, then rescale, normalize and patchify (Qwen2VLImageProcessorPil's steps)."""
    item = family.plan_image(image.height, image.width)
    p = family.settings.patch_size
    pixels, grid = _pixels(family, pil_resize(image, item.grid[1] * p, item.grid[2] * p))
    assert grid == item.grid
    return pixels, item


def preprocess_video(family, frames: torch.Tensor, frame_indices: list[int], video_fps: float):
    """Bicubic antialiased resize of the sampled frames, then Qwen3VLVideoProcessor's fused rescale-and-normalize
    ((x - 255 mean) / (255 std) in float32, which rounds differently from the image path) and patchify."""
    s = family.settings
    item = family.plan_video(frame_indices, video_fps, frames.shape[1], frames.shape[2])
    video = resize_frames(frames, item.grid[1] * s.patch_size, item.grid[2] * s.patch_size)
    video = normalize_fused(video, s.image_mean, s.image_std)
    if pad := -video.shape[0] % s.temporal_patch_size:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    t, (_, gh, gw), m, p = item.grid[0], item.grid, s.merge_size, s.patch_size
    patches = video.view(t, s.temporal_patch_size, 3, gh // m, m, p, gw // m, m, p)
    pixels = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * gh * gw, -1)
    return pixels, item


def load_vision_tower(model_dir: str, dtype: torch.dtype | None = None, device=None) -> Qwen3VLVisionModel:
    """Only the vision tower, built from the checkpoint's vision_config and filled from its model.visual.* tensors."""
    config = AutoConfig.from_pretrained(model_dir).vision_config
    return load_part(lambda: Qwen3VLVisionModel._from_config(config), model_dir, VISION_KEYS, dtype, device)


@torch.no_grad()
def encode(tower: Qwen3VLVisionModel, pixels: torch.Tensor, items: list[MediaItem]) -> list[EncodedItem]:
    """One tower pass over the items' concatenated pixels, split back per item."""
    grid = torch.tensor([item.grid for item in items], device=pixels.device)
    out = tower(pixels.to(tower.dtype), grid_thw=grid, return_dict=True)
    sizes = (grid.prod(-1) // tower.spatial_merge_size ** 2).tolist()
    embeds = out.pooler_output.split(sizes)
    deepstack = [feature.split(sizes) for feature in out.deepstack_features]
    return [EncodedItem(embeds[i], tuple(d[i] for d in deepstack)) for i in range(len(items))]
