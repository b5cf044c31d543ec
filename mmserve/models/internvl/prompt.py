"""InternVL's language-model side: 1-D positions, the splice of projected tiles at '<IMG_CONTEXT>', text-model loading."""

from __future__ import annotations

import torch

from mmserve.models.family import EncodedItem


def positions(ids: list[int]) -> tuple[torch.Tensor, int]:
    """[1, N] positions 0..N-1; later tokens continue the count (delta 0)."""
    return torch.arange(len(ids)).view(1, -1), 0


def language_model_inputs(family, embed_tokens, ids: list[int], encoded: list[EncodedItem]) -> dict:
    """Keyword arguments of the text model's forward for one expanded prompt (batch of one)."""
    input_ids = torch.tensor([ids])
    embeds = embed_tokens(input_ids)
    if encoded:
        mask = (input_ids == family.settings.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, torch.cat([e.embeddings for e in encoded]).to(embeds.dtype))
    return dict(inputs_embeds=embeds, position_ids=positions(ids)[0])


def load_language_model(model_dir: str, dtype=None, device=None):
    """Only the text model (model.language_model.*, a Qwen2 or Llama model) and the lm_head weight."""
    from transformers import AutoConfig, AutoModel

    from mmserve.models.weights import load_text_model

    config = AutoConfig.from_pretrained(model_dir)
    cls = AutoModel._model_mapping[type(config.text_config)]  # Qwen2Model, LlamaModel, ... by text model_type
    return load_text_model(cls, config, model_dir, r"^(model\.)?language_model\.(model\.)?", dtype, device)
