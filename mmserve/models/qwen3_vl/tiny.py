"""Build a random-weight Qwen3-VL checkpoint in the real Hugging Face layout (config, weights, tokenizer with
Qwen3-VL's special tokens and chat template, processor files), fully offline."""

from __future__ import annotations

import json
import os
import pathlib

import torch

from mmserve.models import tiny as base
from mmserve.models.qwen3_vl import chat_template

SPECIAL_TOKENS = base._SPECIAL_TOKENS
NON_SPECIAL_TOKENS = base._NON_SPECIAL_ADDED_TOKENS + ["<tool_response>", "</tool_response>", "<think>", "</think>"]

# text_config / vision_config overrides and the saved dtype. "qwen3-vl-2b-width" keeps the real 2B widths and
# vocabulary with few layers, for benchmarks.
PRESETS: dict[str, tuple[dict, dict, torch.dtype]] = {
    "tiny": ({}, {}, torch.float32),
    "qwen3-vl-2b-width": (
        {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 4,
         "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
         "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                             "mrope_interleaved": True}},
        {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "out_hidden_size": 2048,
         "deepstack_visual_indexes": [5, 11, 17]},
        torch.bfloat16),
}


def _processor_files(out: pathlib.Path) -> None:
    common = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
              "image_std": [0.5, 0.5, 0.5], "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "do_convert_rgb": True, "do_resize": True, "processor_class": "Qwen3VLProcessor"}
    image = {**common, "image_processor_type": "Qwen2VLImageProcessor",
             "size": {"shortest_edge": 65536, "longest_edge": 16777216}}
    video = {**common, "video_processor_type": "Qwen3VLVideoProcessor", "fps": 2, "min_frames": 4,
             "max_frames": 768, "do_sample_frames": True, "size": {"shortest_edge": 4096, "longest_edge": 25165824}}
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))


def build(out_dir: str | os.PathLike, seed: int = 0, preset: str = "tiny", thinking: bool = False,
          dtype: torch.dtype | None = None) -> pathlib.Path:
    """Write a random-weight Qwen3-VL checkpoint (the Thinking variant's template if thinking) to out_dir."""
    if preset not in PRESETS:
        raise ValueError(f"preset: {preset!r} is not one of {sorted(PRESETS)}")
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = base._build_tokenizer(SPECIAL_TOKENS, NON_SPECIAL_TOKENS)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    eos, endoftext = ids["<|im_end|>"], ids["<|endoftext|>"]
    text, vision, preset_dtype = PRESETS[preset]
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": -(-tok.get_vocab_size(with_added_tokens=True) // 64) * 64, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            # head_dim 32, not hidden / heads = 16: code that derives it from the hidden size fails here, as it
            # would on Qwen3-VL-4B (2560 hidden, 32 heads of 128).
            "head_dim": 32, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5],
                                "mrope_interleaved": True},
            "bos_token_id": endoftext, "eos_token_id": eos, "pad_token_id": endoftext, **text,
        },
        vision_config={
            "depth": 3, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "out_hidden_size": 64,
            "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2, "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0, 1], **vision,
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False, architectures=["Qwen3VLForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).to(torch.float32).eval()
    base.make_input_sensitive(model, eos=eos, endoftext=endoftext)
    model.to(dtype or preset_dtype).save_pretrained(out, safe_serialization=True)

    tok.save(str(out / "tokenizer.json"))
    config_json = base._tokenizer_config(tok)
    config_json["added_tokens_decoder"] = base.added_tokens_decoder(tok, SPECIAL_TOKENS, NON_SPECIAL_TOKENS)
    config_json["chat_template"] = chat_template.THINKING if thinking else chat_template.INSTRUCT
    config_json["model_max_length"] = 262144
    (out / "tokenizer_config.json").write_text(json.dumps(config_json, indent=2, ensure_ascii=False))
    _processor_files(out)
    return out
