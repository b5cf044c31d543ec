"""InternVL frames on the decoder's side (an image's tiles and thumbnail) and their pixel values on the encoder's."""

from __future__ import annotations

import torch

from mmserve.models.family import MediaItem
from mmserve.models.pixels import normalize_fused, pil_resize


def image_frames(family, image, item: MediaItem) -> torch.Tensor:
    """uint8 [tiles, tile, tile, 3]: the canvas (PIL bicubic) cut row by row, then a thumbnail of the whole image."""
    s = family.settings
    num_tiles, cols, rows = item.grid
    canvas = pil_resize(image, rows * s.tile_size, cols * s.tile_size)[0]
    tiles = canvas.view(rows, s.tile_size, cols, s.tile_size, 3).permute(0, 2, 1, 3, 4).reshape(
        rows * cols, s.tile_size, s.tile_size, 3)
    if num_tiles > rows * cols:
        tiles = torch.cat([tiles, pil_resize(image, s.tile_size, s.tile_size)])
    return tiles.contiguous()


def _rescale_normalize(tiles: torch.Tensor, mean, std) -> torch.Tensor:
    """The image processor's rescale (float64 multiply, float32 result) then float32 normalize, [N,3,H,W]."""
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
        return _rescale_normalize(frames, s.image_mean, s.image_std), MediaItem("image", (frames.shape[0], 0, 0))
    return normalize_fused(frames, s.image_mean, s.image_std), family.plan_video(frames.shape[0])
