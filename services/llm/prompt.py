"""Chat messages → token ids with media placeholders expanded, spliced embeddings and M-RoPE positions."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class MediaInput:
    """One image or video's vision embeddings as the encoder produced them."""

    kind: str  # "image" or "video"
    embeddings: torch.Tensor  # [num_tokens, hidden]
    grid_thw: tuple[int, int, int]
    second_per_grid_t: float = 0.0


@dataclasses.dataclass(frozen=True)
class ChatMessage:
    role: str
    parts: list[str | MediaInput]


@dataclasses.dataclass(frozen=True)
class MultimodalPrompt:
    """What the runner needs beyond token ids: media rows to splice in and 3-axis positions."""

    embeddings: torch.Tensor | None  # [num_media_tokens, hidden], in prompt order
    rows: torch.Tensor | None  # [num_prompt_tokens] row into embeddings, -1 for text
    positions: torch.Tensor  # [3, num_prompt_tokens]
    rope_delta: int  # generated token at index p sits at position p + rope_delta on every axis
    spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # each media's placeholder range
    media: list[MediaInput] = dataclasses.field(default_factory=list)  # in prompt order


class PromptError(ValueError):
    """A prompt the model cannot take."""


class PromptBuilder:
    """Applies the checkpoint's chat template and places media the way Qwen2.5-VL's processor does."""

    def __init__(self, tokenizer, config):
        self.tokenizer = tokenizer
        self.merge = config.vision_config.spatial_merge_size
        self.tokens_per_second = config.vision_config.tokens_per_second
        self.pad_ids = {"image": config.image_token_id, "video": config.video_token_id}

    def build(self, messages: list[ChatMessage]) -> tuple[list[int], MultimodalPrompt]:
        """Token ids of the prompt (ending with the assistant turn's header) and its multimodal data."""
        conversation = [
            {"role": m.role, "content": [
                {"type": "text", "text": p} if isinstance(p, str) else {"type": p.kind} for p in m.parts]}
            for m in messages
        ]
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        media = [p for m in messages for p in m.parts if not isinstance(p, str)]
        return self._expand(ids, media)

    def _expand(self, ids: list[int], media: list[MediaInput]) -> tuple[list[int], MultimodalPrompt]:
        by_kind = {kind: [m for m in media if m.kind == kind] for kind in self.pad_ids}
        for kind, pad in self.pad_ids.items():
            if ids.count(pad) != len(by_kind[kind]):
                raise PromptError(f"text: contains the reserved placeholder token for {kind}s")
        pending = {kind: iter(items) for kind, items in by_kind.items()}
        kind_of = {pad: kind for kind, pad in self.pad_ids.items()}
        out: list[int] = []
        rows: list[int] = []
        ordered: list[MediaInput] = []
        spans: list[tuple[int, int]] = []
        num_media_tokens = 0
        for token in ids:
            kind = kind_of.get(token)
            if kind is None:
                out.append(token)
                rows.append(-1)
                continue
            item = next(pending[kind])
            n = item.embeddings.shape[0]
            t, h, w = item.grid_thw
            if n != t * h * w // (self.merge * self.merge):
                raise PromptError(f"{kind}: {n} embeddings do not match grid {item.grid_thw}")
            spans.append((len(out), len(out) + n))
            out += [token] * n
            rows += range(num_media_tokens, num_media_tokens + n)
            num_media_tokens += n
            ordered.append(item)
        positions = self.positions(out, ordered)
        delta = int(positions.max()) + 1 - len(out)
        if not ordered:
            return out, MultimodalPrompt(None, None, positions, delta)
        embeddings = torch.cat([m.embeddings for m in ordered])
        return out, MultimodalPrompt(embeddings, torch.tensor(rows), positions, delta, spans, ordered)

    def positions(self, ids: list[int], media: list[MediaInput]) -> torch.Tensor:
        """Qwen2.5-VL's 3-axis rotary positions: text advances all axes, media spreads over (t, h, w)."""
        pads = set(self.pad_ids.values())
        parts: list[torch.Tensor] = []
        current = 0
        i = 0
        items = iter(media)
        while i < len(ids):
            if ids[i] not in pads:
                j = i
                while j < len(ids) and ids[j] not in pads:
                    j += 1
                parts.append(torch.arange(j - i).expand(3, -1) + current)
                current += j - i
                i = j
                continue
            item = next(items)
            t, h, w = item.grid_thw
            gh, gw = h // self.merge, w // self.merge
            # Same arithmetic as transformers' get_rope_index (float32 interval, truncation).
            interval = (torch.tensor(item.second_per_grid_t, dtype=torch.float32) * self.tokens_per_second
                        if item.kind == "video" else 1)
            tt = (torch.arange(t) * interval).long()
            grid = torch.stack(torch.meshgrid(tt, torch.arange(gh) + current, torch.arange(gw) + current,
                                              indexing="ij")).reshape(3, -1)
            grid[0] += current
            parts.append(grid)
            current += max(h, w) // self.merge
            i += t * gh * gw
        return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
