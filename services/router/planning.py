"""What a request will cost, known before any media work: each item's grid from its header, the prompt's length."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import pathlib

import PIL.Image

from mmserve.cache import CachedEmbedding, fits_window
from mmserve.cache_keys import MediaParams
from mmserve.chat_tokens import ChatTokenCounter
from mmserve.media.errors import MediaError
from mmserve.media.probe import probe_video
from mmserve.models.family import DecodePlan, Family, MediaItem
from mmserve.sampling import sampling_from_proto
from mmserve.v1 import api_pb2
from services.router.costs import MediaShape
from services.router.validation import ValidationError


def decode_plan(kind: str, data: bytes | pathlib.Path, params: MediaParams, family: Family) -> DecodePlan | None:
    """What the decoder will make of an item (its bytes or its file), from its header alone (None when the header
    is unreadable or the family refuses it: the decoder then names the problem)."""
    try:
        if kind == "image":
            with PIL.Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
                width, height = image.size
            return family.plan_decode("image", params, height, width)
        info = probe_video(data if isinstance(data, bytes) else str(data))
        plan = family.plan_decode("video", params, info.height, info.width, info.total_frames, info.fps)
    except (OSError, ValueError, PIL.Image.DecompressionBombError, MediaError):
        return None
    if plan.item.second_per_grid_t or not info.total_frames or not info.fps:
        return plan
    # The time axis as the decoder's chunks will give it (sample_fps), so a streamed prompt is known up front.
    sample_fps = plan.num_frames / info.total_frames * info.fps
    return dataclasses.replace(plan, item=dataclasses.replace(
        plan.item, second_per_grid_t=family.second_per_grid_t(sample_fps)))


def shape_of(plan: DecodePlan, family: Family) -> MediaShape:
    """The decode and encode size of a plan."""
    return MediaShape(plan.num_frames, plan.num_frames * plan.height * plan.width, num_patches(family, plan.item))


def num_patches(family: Family, item: MediaItem) -> int:
    """Vision patches the tower runs on for an item (or a video chunk), whatever the family's grid means (an InternVL
    grid is tiles, columns, rows): the unit of the encode cost models."""
    return family.num_tokens(item) * family.patches_per_token


def patch_side(family: Family) -> int:
    """Side in pixels of one vision patch, from the family's own plan of a 448x448 image (the cost models count
    patches; the decoded frames tell only pixels)."""
    shape = shape_of(family.plan_decode("image", family.default_params("image"), 448, 448), family)
    return round(math.sqrt(shape.num_pixels / shape.num_patches))


@dataclasses.dataclass(frozen=True)
class Chunks:
    """How one planned item streams to the llm: fixed windows of sampled frames and each chunk's embedding rows."""

    chunk_frames: int  # sampled frames per window, the last may hold fewer (0: an image, one chunk)
    rows: tuple[int, ...]  # embedding rows of each chunk, in order
    num_frames: int  # sampled frames of the whole item

    @property
    def num_chunks(self) -> int:
        return len(self.rows)

    def frames_of(self, chunk_index: int) -> tuple[int, int]:
        """The chunk's first sampled frame and its number of frames."""
        if not self.chunk_frames:
            return 0, self.num_frames
        first = chunk_index * self.chunk_frames
        return first, min(self.chunk_frames, self.num_frames - first)


def plan_chunks(plan: DecodePlan, family: Family, chunk_frames: int) -> Chunks:
    """The fixed windows of a planned item: chunk_frames rounded to the family's temporal group (at least one
    group), cut only where the family allows (between temporal groups); an image is one chunk."""
    item = plan.item
    total = family.num_tokens(item)
    if item.kind != "video":
        return Chunks(0, (total,), plan.num_frames)
    cuts = family.chunk_boundaries(item)
    num_groups = len(cuts) + 1
    per_group = -(-plan.num_frames // num_groups)  # sampled frames per temporal group
    groups = max(1, round(chunk_frames / per_group))
    offsets = [0, *cuts, total]
    rows = tuple(offsets[min(g + groups, num_groups)] - offsets[g] for g in range(0, num_groups, groups))
    return Chunks(groups * per_group, rows, plan.num_frames)


def cached_chunks(entries: list[CachedEmbedding | None], chunks: Chunks, dtype: str) -> tuple[int, ...]:
    """The windows whose entries (headers, in chunk order) fit the plan: the rest must be decoded and encoded."""
    return tuple(i for i, entry in enumerate(entries)
                 if fits_window(entry, i, chunks.num_chunks, chunks.frames_of(i)[0], chunks.rows[i], dtype))


def missing_shape(planned: MediaShape, chunks: Chunks, missing: tuple[int, ...]) -> MediaShape | None:
    """The decode and encode size of the missing windows alone (None when every window is cached)."""
    if not missing:
        return None
    frames = sum(chunks.frames_of(i)[1] for i in missing)
    rows = sum(chunks.rows[i] for i in missing)
    return MediaShape(frames, planned.num_pixels * frames // max(1, chunks.num_frames),
                      planned.num_patches * rows // max(1, sum(chunks.rows)))


def planned_shape(kind: str, data: bytes | pathlib.Path, params: MediaParams, family: Family) -> MediaShape | None:
    """An item's exact decode and encode size from its header alone, as the decoder will resize it (None when the
    header is unreadable: the decoder then names the problem)."""
    plan = decode_plan(kind, data, params, family)
    return shape_of(plan, family) if plan is not None else None


@dataclasses.dataclass(frozen=True)
class PromptSize:
    """A request's prompt in tokens, as the llm will build it."""

    num_text_tokens: int
    num_vision_tokens: int

    @property
    def num_tokens(self) -> int:
        return self.num_text_tokens + self.num_vision_tokens


class PromptBudget:
    """Counts a request's prompt exactly (chat template, the family's markup around each item, tokenizer, planned
    grids) and refuses, with INVALID_ARGUMENT, one that exceeds the vision-token cap or cannot fit the context: such
    a request can never succeed, so it is never told to retry."""

    def __init__(self, model_dir: str, family: Family, *, max_model_len: int, max_vision_tokens: int):
        self.counter = ChatTokenCounter(model_dir)
        self.family = family
        config = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
        positions = config.get("text_config", config).get("max_position_embeddings") or max_model_len
        self.context_len = min(max_model_len, positions)  # what the llm allows (services/llm/engine.py)
        self.max_vision_tokens = max_vision_tokens

    def check(self, request: api_pb2.GenerateRequest, items: list[MediaItem]) -> PromptSize:
        """The prompt's size given each media item as the family plans it, in prompt order; ValidationError when
        it is over a cap."""
        num_vision = sum(self.family.num_tokens(item) for item in items)
        if num_vision > self.max_vision_tokens:
            raise ValidationError(f"messages: {num_vision} vision tokens exceed the limit of {self.max_vision_tokens} "
                                  "per request (fewer frames or pixels would fit)")
        try:
            count = self.counter.count_expanded(conversation(request), self.family, items)
        except ValueError:  # the text holds a placeholder of its own: the family's expansion finds one too many
            raise ValidationError("text: contains a reserved media placeholder token") from None
        size = PromptSize(count.num_text_tokens, num_vision)
        max_tokens = sampling_from_proto(request.sampling).max_tokens
        if size.num_tokens + max_tokens > self.context_len:
            raise ValidationError(f"prompt: {size.num_tokens} tokens ({size.num_text_tokens} text + {num_vision} "
                                  f"vision) + max_tokens {max_tokens} exceed the context length {self.context_len}")
        return size


def conversation(request: api_pb2.GenerateRequest) -> list[dict]:
    """The request's messages in the chat template's content-list form, media as placeholders (as the llm does)."""
    return [{"role": m.role, "content": [{"type": "text", "text": p.text} if p.WhichOneof("content") == "text"
                                         else {"type": p.WhichOneof("content")} for p in m.parts]}
            for m in request.messages]
