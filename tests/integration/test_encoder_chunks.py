"""Vision attention stays within a temporal patch: a video encodes in chunks exactly as a whole."""

from __future__ import annotations

import torch

from mmserve.media.preprocess import ImageProcessing, to_pixel_values
from mmserve.models import loading


def test_chunked_and_whole_video_embeddings_agree(tiny_model):
    tower = loading.load_vision_tower(str(tiny_model))
    p = ImageProcessing.from_pretrained(tiny_model)
    frames = torch.randint(0, 256, (12, 112, 168, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def encode(clip: torch.Tensor) -> torch.Tensor:
        pixels, grid = to_pixel_values(clip, patch_size=p.patch_size, temporal_patch_size=p.temporal_patch_size,
                                       merge_size=p.merge_size, image_mean=p.image_mean, image_std=p.image_std)
        with torch.inference_mode():
            return tower(pixels, grid_thw=torch.tensor([grid])).pooler_output

    whole = encode(frames)
    chunked = torch.cat([encode(frames[i:i + 4]) for i in range(0, 12, 4)])
    uneven = torch.cat([encode(frames[:2]), encode(frames[2:8]), encode(frames[8:])])
    assert whole.shape == chunked.shape
    assert (whole - chunked).abs().max() <= 1e-5
    assert (whole - uneven).abs().max() <= 1e-5
