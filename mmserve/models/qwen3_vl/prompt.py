"""Qwen3-VL positions (3-axis, each video group on its own timestamp) and the language model's inputs with DeepStack."""

from __future__ import annotations

import torch

from mmserve.models.family import EncodedItem, MediaItem


def positions(family, ids: list[int], items: list[MediaItem]) -> tuple[torch.Tensor, int]:
    """[3, N] positions of an expanded prompt and its rope delta (transformers' Qwen3VLModel.get_rope_index).

    Text advances all axes by one per token; each image, and each temporal group of a video, spreads over
    (h, w) from the current position with its time axis at the current position, then advances by max(h, w).
    """
    s = family.settings
    pads = {s.image_token_id, s.video_token_id}
    groups = iter([(item.grid[1] // s.merge_size, item.grid[2] // s.merge_size)
                   for item in items for _ in range(item.grid[0])])
    parts: list[torch.Tensor] = []
    current, i = 0, 0
    while i < len(ids):
        j = i
        if ids[i] in pads:
            gh, gw = next(groups)
            hh, ww = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
            parts.append(torch.stack([torch.zeros(gh * gw, dtype=torch.long), hh.flatten(), ww.flatten()]) + current)
            current += max(gh, gw)
            i += gh * gw
            continue
        while j < len(ids) and ids[j] not in pads:
            j += 1
        parts.append(torch.arange(j - i).expand(3, -1) + current)
        current += j - i
        i = j
    out = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
    return out, int(out.max()) + 1 - len(ids) if len(ids) else 0


def language_model_inputs(family, embed_tokens, ids: list[int], encoded: list[EncodedItem],
                          items: list[MediaItem]) -> dict:
    """Keyword arguments of Qwen3VLTextModel.forward for one expanded prompt (batch of one).

    The item rows replace the pad embeddings in prompt order; DeepStack features are added, by the text model,
    after its first layers at the same (visual) positions, so they are passed in the same order.
    """
    s = family.settings
    input_ids = torch.tensor([ids])
    embeds = embed_tokens(input_ids)
    kwargs: dict = {}
    if encoded:
        mask = (input_ids == s.image_token_id) | (input_ids == s.video_token_id)
        rows = torch.cat([e.embeddings for e in encoded]).to(embeds.dtype)
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), rows)
        deepstack = [torch.cat(layer).to(embeds.dtype) for layer in zip(*(e.deepstack for e in encoded))]
        if deepstack:
            kwargs.update(visual_pos_masks=mask, deepstack_visual_embeds=deepstack)
    pos, _ = positions(family, ids, items)
    text_pos = torch.arange(len(ids)).view(1, -1)
    # Row 0 is the plain text position (the causal mask's), rows 1-3 the M-RoPE axes, as transformers passes them.
    position_ids = torch.cat([text_pos, pos]).unsqueeze(1)
    return dict(inputs_embeds=embeds, position_ids=position_ids, **kwargs)


def load_language_model(model_dir: str, dtype=None, device=None):
    """Only the text model (model.language_model.*) and the lm_head weight."""
    from transformers import AutoConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    from mmserve.models.weights import load_text_model

    return load_text_model(Qwen3VLTextModel, AutoConfig.from_pretrained(model_dir), model_dir,
                           r"^(model\.)?language_model\.", dtype, device)
