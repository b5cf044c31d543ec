"""Build a random-weight InternVL checkpoint in transformers' InternVL layout (InternViT, projector, Qwen2 text model,
a tokenizer with InternVL's image tokens and chat template, processor files), fully offline."""

from __future__ import annotations

import json
import os
import pathlib

import torch

from mmserve.models import tiny as base

# InternVL3's tokenizer: Qwen2.5's added tokens, then InternVL's image and grounding tokens.
SPECIAL_TOKENS = base._SPECIAL_TOKENS + ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
                                         "<box>", "</box>", "<video>"]
NON_SPECIAL_TOKENS = base._NON_SPECIAL_ADDED_TOKENS
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)
# text_config / vision_config overrides and the saved dtype; "internvl3-1b-width" keeps InternVL3-1B's widths and
# vocabulary with few layers, for benchmarks.
PRESETS: dict[str, tuple[dict, dict, torch.dtype]] = {
    "tiny": ({}, {}, torch.float32),
    # InternVL3.5's text model is Qwen3 (q_norm/k_norm, an explicit head_dim: 32 here, not hidden / heads).
    "tiny-qwen3": ({"model_type": "qwen3", "head_dim": 32}, {}, torch.float32),
    "internvl3-1b-width": (
        {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 4,
         "num_attention_heads": 14, "num_key_value_heads": 2},
        {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 6, "num_attention_heads": 16},
        torch.bfloat16),
}


def _processor_files(out: pathlib.Path) -> None:
    common = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "do_convert_rgb": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
              "size": {"height": 448, "width": 448}, "processor_class": "InternVLProcessor"}
    image = {**common, "image_processor_type": "GotOcr2ImageProcessor", "crop_to_patches": True,
             "min_patches": 1, "max_patches": 12}
    video = {**common, "video_processor_type": "InternVLVideoProcessor", "num_frames": 8, "initial_shift": True}
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    (out / "processor_config.json").write_text(json.dumps({"image_seq_length": 256,
                                                           "processor_class": "InternVLProcessor"}, indent=2))


def build(out_dir: str | os.PathLike, seed: int = 0, preset: str = "tiny",
          dtype: torch.dtype | None = None) -> pathlib.Path:
    """Write a random-weight InternVL checkpoint to out_dir."""
    if preset not in PRESETS:
        raise ValueError(f"preset: {preset!r} is not one of {sorted(PRESETS)}")
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = base._build_tokenizer(SPECIAL_TOKENS, NON_SPECIAL_TOKENS)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    eos, endoftext = ids["<|im_end|>"], ids["<|endoftext|>"]
    text, vision, preset_dtype = PRESETS[preset]
    config = InternVLConfig(
        text_config={
            "model_type": "qwen2", "vocab_size": -(-tok.get_vocab_size(with_added_tokens=True) // 64) * 64,
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
            "bos_token_id": endoftext, "eos_token_id": eos, "pad_token_id": endoftext, **text,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": [448, 448], "patch_size": [14, 14], "use_absolute_position_embeddings": True,
            "norm_type": "layer_norm", **vision,
        },
        image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=256, downsample_ratio=0.5,
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False,
        architectures=["InternVLForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).to(torch.float32).eval()
    base.make_input_sensitive(model, eos=eos, endoftext=endoftext)
    model.to(dtype or preset_dtype).save_pretrained(out, safe_serialization=True)

    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = base._tokenizer_config(tok)
    tokenizer_config["added_tokens_decoder"] = base.added_tokens_decoder(tok, SPECIAL_TOKENS, NON_SPECIAL_TOKENS)
    tokenizer_config["extra_special_tokens"] = {"start_image_token": "<img>", "end_image_token": "</img>",
                                                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    tokenizer_config["model_max_length"] = 8192
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    _processor_files(out)
    return out
