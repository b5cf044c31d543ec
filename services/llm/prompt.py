"""Chat messages → token ids with media placeholders expanded, spliced embeddings and the family's positions."""

from __future__ import annotations

import dataclasses

import torch

from mmserve.models.family import Family, MediaItem
from services.llm.streamed import ChunkedMedia


@dataclasses.dataclass(frozen=True)
class MediaInput:
    """One image or video's vision embeddings as the encoder produced them (unpacked), or only planned: without
    embeddings, which then arrive later in the chunks of chunk_rows (GenerateStreamed)."""

    kind: str  # "image" or "video"
    embeddings: torch.Tensor | None  # [num_tokens, hidden]; None: planned, streamed in chunks
    grid_thw: tuple[int, int, int]  # the family's grid: Qwen (t, h, w); InternVL (tiles, columns, rows)
    second_per_grid_t: float = 0.0
    timestamps: tuple[float, ...] = ()  # video: seconds of each temporal group (Qwen3-VL writes them in the prompt)
    deepstack: tuple[torch.Tensor, ...] = ()  # [num_tokens, hidden] per DeepStack layer (Qwen3-VL)
    chunk_rows: tuple[int, ...] = ()  # planned: embedding rows of each chunk, in order (empty: one chunk)
    digest: str = ""  # planned: the item's identity for the prefix cache (the router's media key)


@dataclasses.dataclass(frozen=True)
class ChatMessage:
    role: str
    parts: list[str | MediaInput]


@dataclasses.dataclass(frozen=True)
class MultimodalPrompt:
    """What the runner needs beyond token ids: media rows to splice in, DeepStack rows to add, and positions."""

    embeddings: torch.Tensor | None  # [num_media_tokens, hidden], in prompt order
    rows: torch.Tensor | None  # [num_prompt_tokens] row into embeddings (and deepstack), -1 for text
    positions: torch.Tensor  # [axes, num_prompt_tokens] (3 for M-RoPE, 1 for plain RoPE)
    rope_delta: int  # generated token at index p sits at position p + rope_delta on every axis
    spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # each media's placeholder range
    media: list[MediaInput] = dataclasses.field(default_factory=list)  # in prompt order
    # One [num_media_tokens, hidden] per DeepStack layer, rows aligned with embeddings: added after that layer.
    deepstack: tuple[torch.Tensor, ...] = ()
    streamed: ChunkedMedia | None = None  # planned media: the rows arrive in chunks (embeddings is None)

    def media_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The embeddings and DeepStack rows of media rows (indices into the prompt's media rows)."""
        if self.streamed is not None:
            return self.streamed.gather(rows)
        return self.embeddings[rows], [layer[rows] for layer in self.deepstack]


class PromptError(ValueError):
    """A prompt the model cannot take."""


class PromptBuilder:
    """Applies the checkpoint's chat template, then the family's placeholder expansion and positions."""

    def __init__(self, tokenizer, family: Family, config):
        self.tokenizer = tokenizer
        self.family = family
        # The template writes one placeholder per item; the config names each kind's token.
        self.pad_ids = {kind: getattr(config, f"{kind}_token_id") for kind in ("image", "video")
                        if getattr(config, f"{kind}_token_id", None) is not None}
        # Every item must bring the features of each layer the text model adds them after (Qwen3-VL's DeepStack).
        vision = getattr(config, "vision_config", None)
        self.num_deepstack_layers = len(getattr(vision, "deepstack_visual_indexes", None) or ())
        self.hidden_size = (getattr(config, "text_config", None) or config).hidden_size  # a packed chunk's column block
        # A family that writes each temporal group's time into the prompt (Qwen3-VL) needs every video's timestamps.
        self.writes_timestamps = bool(family.timestamps([0, 1], 1.0))

    def build(self, messages: list[ChatMessage]) -> tuple[list[int], MultimodalPrompt]:
        """Token ids of the prompt (ending with the assistant turn's header) and its multimodal data."""
        conversation = [
            {"role": m.role, "content": [
                {"type": "text", "text": p} if isinstance(p, str) else {"type": p.kind} for p in m.parts]}
            for m in messages
        ]
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        media = [p for m in messages for p in m.parts if not isinstance(p, str)]
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        for kind, pad in self.pad_ids.items():
            if ids.count(pad) != sum(1 for m in media if m.kind == kind):
                raise PromptError(f"text: contains the reserved placeholder token for {kind}s")
        items = [MediaItem(m.kind, tuple(m.grid_thw), tuple(m.timestamps), m.second_per_grid_t) for m in media]
        self._check(media, items)
        expanded = self.family.expand_prompt(text, items)
        if expanded != text:
            ids = self.tokenizer.encode(expanded, add_special_tokens=False)
        return self._expand(ids, media, items)

    def _check(self, media: list[MediaInput], items: list[MediaItem]) -> None:
        if len({m.embeddings is None for m in media}) > 1:
            raise PromptError("media: either every item brings its embeddings or every item is streamed")
        for m, item in zip(media, items):
            if (m.timestamps or (m.kind == "video" and self.writes_timestamps)) and len(m.timestamps) != m.grid_thw[0]:
                raise PromptError(f"{m.kind}: {len(m.timestamps)} timestamps for {m.grid_thw[0]} temporal groups")
            if m.embeddings is None:
                rows = m.chunk_rows or (self.family.num_tokens(item),)
                if min(rows) < 1 or sum(rows) != self.family.num_tokens(item):
                    raise PromptError(f"{m.kind}.chunk_rows: {list(rows)} do not add up to the "
                                      f"{self.family.num_tokens(item)} rows of grid {m.grid_thw}")
                continue
            if m.embeddings.shape[0] != self.family.num_tokens(item):
                raise PromptError(f"{m.kind}: {m.embeddings.shape[0]} embeddings do not match grid {m.grid_thw}")
            if len(m.deepstack) != self.num_deepstack_layers:
                raise PromptError(f"{m.kind}: embeddings carry {len(m.deepstack)} DeepStack layers, the model "
                                  f"takes {self.num_deepstack_layers}")

    def _expand(self, ids: list[int], media: list[MediaInput],
                items: list[MediaItem]) -> tuple[list[int], MultimodalPrompt]:
        try:
            out = self.family.expand_ids(ids, items)
        except ValueError as err:
            raise PromptError(f"text: contains a reserved media placeholder token ({err})") from None
        positions, delta = self.family.positions(out, items)
        if not media:
            return out, MultimodalPrompt(None, None, positions, delta)
        # Embedding rows fill the placeholders in prompt order; an item's span runs from its first to last row.
        pads = set(self.pad_ids.values())
        where = [i for i, token in enumerate(out) if token in pads]
        rows = torch.full((len(out),), -1, dtype=torch.long)
        rows[where] = torch.arange(len(where))
        spans, first = [], 0
        for item in items:
            last = first + self.family.num_tokens(item)
            spans.append((where[first], where[last - 1] + 1))
            first = last
        if media[0].embeddings is None:
            width = self.hidden_size * (1 + self.num_deepstack_layers)
            streamed = ChunkedMedia([m.chunk_rows or (self.family.num_tokens(i),) for m, i in zip(media, items)],
                                    where, width)
            return out, MultimodalPrompt(None, rows, positions, delta, spans, media, streamed=streamed)
        embeddings = torch.cat([m.embeddings for m in media])
        deepstack = tuple(torch.cat(layer) for layer in zip(*(m.deepstack for m in media)))
        return out, MultimodalPrompt(embeddings, rows, positions, delta, spans, media, deepstack)
