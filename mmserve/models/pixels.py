"""Pixel steps shared by families: PIL resize as transformers' PIL processors do it, and the fused
rescale-and-normalize of transformers' video processors."""

from __future__ import annotations

import torch
from PIL import Image

from mmserve.media.image import resized_rgb


def pil_resize(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """uint8 [1,H,W,3] of an image converted to RGB and resized with PIL bicubic, as transformers' PIL processors do."""
    return torch.from_numpy(resized_rgb(image, height, width))


def normalize_fused(frames: torch.Tensor, mean, std) -> torch.Tensor:
    """float32 [T,3,H,W] of uint8 [T,H,W,3] frames as (x - 255 mean) / (255 std): transformers' video processors
    fold the 1/255 rescale into the constants, which rounds differently from rescaling first."""
    mean = (torch.tensor(mean, device=frames.device) * 255.0).view(1, 3, 1, 1)
    std = (torch.tensor(std, device=frames.device) * 255.0).view(1, 3, 1, 1)
    return (frames.permute(0, 3, 1, 2).float() - mean) / std
