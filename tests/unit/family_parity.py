"""Shared checks of the family tests: our pipeline's greedy decode against transformers' generate."""

from __future__ import annotations

import torch

MAX_NEW_TOKENS = 6


def our_prompt(family, tokenizer, conversation, items, **template_kwargs) -> list[int]:
    """Chat template → family expansion → token ids, as the llm will build a prompt."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True, **template_kwargs)
    ids = tokenizer.encode(family.expand_prompt(text, items), add_special_tokens=False)
    return family.expand_ids(ids, items)


@torch.no_grad()
def our_greedy(family, text_model, lm_head, ids, encoded, items, num_tokens=MAX_NEW_TOKENS):
    """Greedy tokens and per-step log-probs from our splice and positions fed to the text model alone."""
    inputs = family.language_model_inputs(text_model.get_input_embeddings(), ids, encoded, items)
    tokens, logprobs = [], []
    out = text_model(**inputs, use_cache=True)
    cache = out.past_key_values
    for step in range(num_tokens):
        logits = out.last_hidden_state[0, -1] @ lm_head.T
        logprobs.append(torch.log_softmax(logits.float(), -1))
        token = int(logits.argmax())
        tokens.append(token)
        if step == num_tokens - 1:
            break
        # A generated token advances every position axis by one.
        position_ids = inputs["position_ids"][..., -1:] + step + 1
        out = text_model(inputs_embeds=text_model.get_input_embeddings()(torch.tensor([[token]])),
                         position_ids=position_ids, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    return tokens, torch.stack(logprobs)


@torch.no_grad()
def hf_greedy(model, inputs: dict, num_tokens=MAX_NEW_TOKENS):
    """transformers' generate, greedy, with its per-step log-probs."""
    out = model.generate(**inputs, max_new_tokens=num_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return tokens, torch.log_softmax(torch.stack([s[0] for s in out.logits]).float(), -1)


def assert_same_decode(ours, theirs):
    """Same greedy tokens and top-5 log-probs within 1e-4 at every step."""
    (tokens, logprobs), (hf_tokens, hf_logprobs) = ours, theirs
    n = len(hf_tokens)  # generate stops early at an end-of-turn token; ours decodes on
    tokens, logprobs = tokens[:n], logprobs[:n]
    assert tokens == hf_tokens
    top = hf_logprobs.topk(5, dim=-1)
    assert torch.allclose(logprobs.gather(-1, top.indices), top.values, atol=1e-4)


def hf_generate_inputs(family, ids: list[int], media: list) -> dict:
    """generate's inputs for prompt ids (the family's expansion, proved equal to transformers' processors) and the
    pixels of each media item [(pixels, item)] in prompt order, as the family's transformers class takes them."""
    input_ids = torch.tensor([ids])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if family.name == "internvl":
        if media:  # every tile and frame in prompt order
            inputs["pixel_values"] = torch.cat([pixels for pixels, _ in media])
        return inputs
    settings = family.settings
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == settings.image_token_id] = 1
    types[input_ids == settings.video_token_id] = 2
    inputs["mm_token_type_ids"] = types
    for kind, pixels_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                       ("video", "pixel_values_videos", "video_grid_thw")):
        of_kind = [(pixels, item) for pixels, item in media if item.kind == kind]
        if of_kind:
            inputs[pixels_key] = torch.cat([pixels for pixels, _ in of_kind])
            inputs[grid_key] = torch.tensor([item.grid for _, item in of_kind])
    return inputs
