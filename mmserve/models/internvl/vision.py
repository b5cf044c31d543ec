"""InternVL media preprocessing (448-pixel tiles and thumbnail; frames as single tiles), and the vision encoder:
InternViT, pixel shuffle, MLP projector."""

from __future__ import annotations

import torch
from transformers import AutoConfig
from transformers.models.internvl.modeling_internvl import (
    InternVLModel,
    InternVLMultiModalProjector,
    InternVLVisionModel,
)

from mmserve.media.preprocess import resize_frames
from mmserve.models.family import EncodedItem, MediaItem
from mmserve.models.internvl.frames import rescale_normalize
from mmserve.models.pixels import normalize_fused
from mmserve.models.weights import load_part

# Keeps the module names: the encoder below holds vision_tower and multi_modal_projector as the full model does.
ENCODER_KEYS = r"^(model\.)?(?=vision_tower\.|multi_modal_projector\.)"


def preprocess_image(family, image) -> tuple[torch.Tensor, MediaItem]:
    """Resize to the tile canvas and cut it into tiles, then add a thumbnail of the whole image (PIL bicubic)."""
    s = family.settings
    item = family.plan_image(image.height, image.width)
    return rescale_normalize(torch.from_numpy(family.tiles(image, item)), s.image_mean, s.image_std), item


def preprocess_video(family, frames: torch.Tensor) -> tuple[torch.Tensor, MediaItem]:
    """Each sampled frame resized to one tile (bicubic, antialiased) with the video processor's fused normalize."""
    s = family.settings
    resized = resize_frames(frames, s.tile_size, s.tile_size)
    return normalize_fused(resized, s.image_mean, s.image_std), family.plan_video(frames.shape[0])


class Encoder(torch.nn.Module):
    """InternViT → drop CLS → pixel shuffle → MLP projector: transformers' InternVLModel.get_image_features."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vision_tower = InternVLVisionModel._from_config(config.vision_config)
        self.multi_modal_projector = InternVLMultiModalProjector(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.multi_modal_projector.linear_1.weight.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, H, W] → [tiles * tokens_per_tile, text hidden]."""
        layer = self.config.vision_feature_layer
        out = self.vision_tower(pixel_values=pixel_values.to(self.dtype), output_hidden_states=layer != -1)
        features = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:, :]
        side = int(features.shape[1] ** 0.5)
        features = features.reshape(features.shape[0], side, side, -1)
        features = InternVLModel.pixel_shuffle(self, features, scale_factor=self.config.downsample_ratio)
        return self.multi_modal_projector(features.reshape(-1, features.shape[-1]))


def load_vision_tower(model_dir: str, dtype: torch.dtype | None = None, device=None) -> Encoder:
    """The encoder built from the checkpoint's config, filled from its vision_tower and projector tensors."""
    config = AutoConfig.from_pretrained(model_dir)
    return load_part(lambda: Encoder(config), model_dir, ENCODER_KEYS, dtype, device)


@torch.no_grad()
def encode(tower: Encoder, pixels: torch.Tensor, items: list[MediaItem]) -> list[EncodedItem]:
    """One pass over the items' tiles, split back per item."""
    rows = tower(pixels)
    sizes = [item.grid[0] * rows.shape[0] // pixels.shape[0] for item in items]
    return [EncodedItem(chunk) for chunk in rows.split(sizes)]
