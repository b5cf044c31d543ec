"""InternVL pixel values on the encoder's side of the decoder's frames (an image's tiles and thumbnail, a video's
resized frames)."""

from __future__ import annotations

import torch

from mmserve.models.family import MediaItem
from mmserve.models.pixels import normalize_fused


def rescale_normalize(tiles: torch.Tensor, mean, std) -> torch.Tensor:
    """GotOcr2ImageProcessorPil's rescale (float64 multiply, float32 result) then float32 normalize, [N,3,H,W]."""
    x = (tiles.permute(0, 3, 1, 2).double() * (1 / 255)).float()
    return (x - torch.tensor(mean, device=x.device).view(1, 3, 1, 1)) / torch.tensor(std, device=x.device).view(
        1, 3, 1, 1)


def preprocess_frames(family, kind: str, frames: torch.Tensor) -> tuple[torch.Tensor, MediaItem]:
    """Tiles normalized as the image processor does, or frames as the video processor does (fused)."""
    s = family.settings
    if frames.dtype != torch.uint8 or frames.ndim != 4 or tuple(frames.shape[1:]) != (s.tile_size, s.tile_size, 3):
        raise ValueError(f"expected uint8 [T,{s.tile_size},{s.tile_size},3] frames, got {frames.dtype} "
                         f"{tuple(frames.shape)}")
    if kind == "image":
        return rescale_normalize(frames, s.image_mean, s.image_std), MediaItem("image", (frames.shape[0], 0, 0))
    return normalize_fused(frames, s.image_mean, s.image_std), family.plan_video(frames.shape[0])
