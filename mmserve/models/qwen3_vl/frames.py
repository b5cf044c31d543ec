"""Qwen3-VL pixel values of frames the decoder already sampled and resized (the encoder's input path)."""

from __future__ import annotations

import torch

from mmserve.media.preprocess import to_pixel_values
from mmserve.models.family import MediaItem
from mmserve.models.pixels import normalize_fused


def preprocess_frames(family, kind: str, frames: torch.Tensor) -> tuple[torch.Tensor, MediaItem]:
    """Images: rescale, normalize and patchify (the image processor's steps); videos: the video processor's fused
    rescale-and-normalize, the last frame repeated to fill a temporal group, and the same patch order."""
    s = family.settings
    if kind == "image":
        pixels, grid = to_pixel_values(frames, patch_size=s.patch_size, temporal_patch_size=s.temporal_patch_size,
                                       merge_size=s.merge_size, image_mean=s.image_mean, image_std=s.image_std)
        return pixels, MediaItem("image", grid)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 [T,H,W,3] frames, got {frames.dtype} {tuple(frames.shape)}")
    _, height, width, _ = frames.shape
    m, p, tp = s.merge_size, s.patch_size, s.temporal_patch_size
    if height % (m * p) or width % (m * p):
        raise ValueError(f"frame size {width}x{height} is not a multiple of {m * p}")
    video = normalize_fused(frames, s.image_mean, s.image_std)
    if pad := -video.shape[0] % tp:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    t, gh, gw = video.shape[0] // tp, height // p, width // p
    patches = video.view(t, tp, 3, gh // m, m, p, gw // m, m, p)
    pixels = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * gh * gw, -1)
    return pixels, MediaItem("video", (t, gh, gw))
