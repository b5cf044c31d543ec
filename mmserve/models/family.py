"""The per-family model interface: what router, encoder and llm ask of a checkpoint, and family_of(model_dir).

Planning (sizes, token counts, placeholder text, chunk boundaries) is plain Python so the router can use it
without torch; preprocessing, loading, encoding and splicing import torch inside the family's own modules.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
from typing import Any, Protocol

from mmserve.cache_keys import MediaParams


@dataclasses.dataclass(frozen=True)
class MediaItem:
    """One image or video as planned: its kind and family-specific grid, plus video timing where the family uses it.

    grid: three ints in every family. Qwen families (t, h, w) in patches; InternVL (tiles, columns, rows) for an
    image (canvas tiles plus the thumbnail when there is more than one; columns x rows of the canvas) and
    (frames, 1, 1) for a video.
    """

    kind: str  # "image" or "video"
    grid: tuple[int, ...]
    timestamps: tuple[float, ...] = ()  # video: seconds shown before each temporal group (Qwen3-VL)
    second_per_grid_t: float = 0.0  # video: seconds per temporal patch (Qwen2.5-VL's M-RoPE time axis)


@dataclasses.dataclass(frozen=True)
class EncodedItem:
    """What the vision tower made of one item: the embeddings spliced at its placeholders, and for DeepStack
    families the features added into the first language-model layers at the same positions."""

    embeddings: Any  # torch.Tensor [num_tokens, hidden]
    deepstack: tuple = ()  # torch.Tensors [num_tokens, hidden], one per injected layer

    def rows(self, start: int, stop: int) -> EncodedItem:
        """The item's rows [start, stop) in every tensor (a video chunk's share)."""
        return EncodedItem(self.embeddings[start:stop], tuple(d[start:stop] for d in self.deepstack))


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """What the decoder makes of one image or video: frames kept (their indices in the clip), the size each is
    resized to, and the item. An InternVL image is several frames: its tiles and thumbnail, each height x width."""

    num_frames: int
    height: int
    width: int
    item: MediaItem
    frame_indices: tuple[int, ...] = (0,)


class Family(Protocol):
    """Everything that differs by model family; one implementation per folder under mmserve/models/."""

    name: str
    patches_per_token: int  # vision patches merged into one embedding row

    # -- planning: plain Python --------------------------------------------------------------------------
    def default_params(self, kind: str) -> MediaParams:
        """The preprocessing parameters an image or video gets when the request asks for nothing."""

    def plan_decode(self, kind: str, params: MediaParams, height: int, width: int, total_frames: int = 1,
                    video_fps: float = 0.0) -> DecodePlan:
        """What the decoder makes of an item of this header under params (sampling and resize rules)."""

    def second_per_grid_t(self, sample_fps: float) -> float:
        """Seconds per temporal patch of a video sampled at sample_fps (0 where the family has no time axis)."""

    def timestamps(self, frame_indices: list[int], video_fps: float) -> tuple[float, ...]:
        """Seconds the prompt shows before each temporal group of these sampled frames (() where it shows none)."""

    def image_frames(self, image, plan: DecodePlan):
        """The decoder's uint8 [T,H,W,3] frames (a numpy array: the decoder's workers run without torch) of a PIL
        image under plan (preprocess_frames' input)."""

    def plan_image(self, height: int, width: int) -> MediaItem:
        """The item an image of this size becomes (resize rule, tiling)."""

    def num_tokens(self, item: MediaItem) -> int:
        """Vision embedding rows of an item (placeholder tokens it fills in the prompt)."""

    def chunk_boundaries(self, item: MediaItem) -> list[int]:
        """Row offsets where an item's embeddings may be cut so each chunk encodes exactly like the whole."""

    def expand_prompt(self, text: str, items: list[MediaItem]) -> str:
        """The chat-templated text with each placeholder replaced by the item's markup, one pad per group."""

    def expand_ids(self, ids: list[int], items: list[MediaItem]) -> list[int]:
        """Token ids of expand_prompt's text with each pad repeated to the rows of its group."""

    # -- torch side ---------------------------------------------------------------------------------------
    def preprocess_frames(self, kind: str, frames) -> tuple[Any, MediaItem]:
        """uint8 [T,H,W,3] frames the decoder already sampled and resized → (pixel tensor, item), on their device."""

    def preprocess_image(self, image) -> tuple[Any, MediaItem]:
        """A PIL image → (pixel tensor the tower takes, item)."""

    def preprocess_video(self, frames, frame_indices: list[int], video_fps: float) -> tuple[Any, MediaItem]:
        """Sampled uint8 [T,H,W,3] frames (their indices in a clip at video_fps) → (pixel tensor, item)."""

    def load_vision_tower(self, model_dir: str, dtype, device):
        """Only the vision tower (and projector) of the checkpoint, in eval mode on device."""

    def load_language_model(self, model_dir: str, dtype, device):
        """Only the language model and its lm_head weight."""

    def encode(self, tower, pixels, items: list[MediaItem]) -> list[EncodedItem]:
        """Run the tower on the items' concatenated pixels; one EncodedItem per item."""

    def positions(self, ids: list[int], items: list[MediaItem]):
        """Rotary positions of an expanded prompt ([3, N] M-RoPE or [1, N]) and the rope delta of later tokens."""

    def language_model_inputs(self, embed_tokens, ids: list[int], encoded: list[EncodedItem],
                              items: list[MediaItem]) -> dict:
        """inputs_embeds, position_ids and any injection (DeepStack) kwargs for the text model's forward."""


_FAMILIES = {
    "qwen2_5_vl": "mmserve.models.qwen2_5_vl",
    "qwen3_vl": "mmserve.models.qwen3_vl",
    "qwen3_vl_moe": "mmserve.models.qwen3_vl",
    "internvl": "mmserve.models.internvl",
}


def read_config(model_dir: str | pathlib.Path) -> dict:
    """config.json of a local checkpoint directory."""
    return json.loads((pathlib.Path(model_dir) / "config.json").read_text())


def family_of(model_dir: str | pathlib.Path) -> Family:
    """The family of a checkpoint, from config.json's model_type, set up from the checkpoint's own files."""
    model_type = read_config(model_dir).get("model_type")
    if model_type not in _FAMILIES:
        raise ValueError(f"model: model_type {model_type!r} is not one of {sorted(_FAMILIES)}")
    return importlib.import_module(_FAMILIES[model_type]).from_pretrained(model_dir)


def planning_family(model_dir: str | pathlib.Path) -> Family:
    """The family whose sampling and resize rules a service without a checkpoint follows: the checkpoint's, or
    Qwen2.5-VL's processor defaults when model_dir is empty."""
    if model_dir:
        return family_of(model_dir)
    return importlib.import_module(_FAMILIES["qwen2_5_vl"]).from_defaults()


def expand_pads(ids: list[int], pad_ids: set[int], counts: list[int]) -> list[int]:
    """ids with the i-th pad token repeated counts[i] times."""
    if sum(1 for t in ids if t in pad_ids) != len(counts):
        raise ValueError(f"prompt: {sum(1 for t in ids if t in pad_ids)} placeholders for {len(counts)} groups")
    out: list[int] = []
    pending = iter(counts)
    for token in ids:
        out += [token] * next(pending) if token in pad_ids else [token]
    return out


def replace_each(text: str, placeholder: str, replacements: list[str]) -> str:
    """text with the i-th placeholder replaced by replacements[i]."""
    parts = text.split(placeholder)
    if len(parts) != len(replacements) + 1:
        raise ValueError(f"prompt: {len(parts) - 1} {placeholder} placeholders for {len(replacements)} items")
    return parts[0] + "".join(r + rest for r, rest in zip(replacements, parts[1:]))


def pack(item: EncodedItem):
    """One tensor [rows, hidden * (1 + DeepStack layers)] for the wire and the cache: the DeepStack features as
    column blocks after the embeddings, so rows stay rows and a video's chunks concatenate as before."""
    import torch

    return torch.cat([item.embeddings, *item.deepstack], dim=1) if item.deepstack else item.embeddings


def unpack(tensor, hidden_size: int) -> EncodedItem:
    """pack's inverse: the first hidden_size columns are the embeddings, each further block one DeepStack layer."""
    if tensor.shape[1] % hidden_size:
        raise ValueError(f"embeddings: {tensor.shape[1]} columns are not a multiple of the hidden size {hidden_size}")
    first, *rest = tensor.split(hidden_size, dim=1)
    return EncodedItem(first, tuple(rest))
