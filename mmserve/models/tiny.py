"""Build a tiny random-weight Qwen2.5-VL checkpoint in the real Hugging Face layout, fully offline."""

from __future__ import annotations

import json
import os
import pathlib
import random
import sys
from typing import NamedTuple

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm import tqdm

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)

# Qwen2's pre-tokenizer regex, copied so the tiny tokenizer splits text exactly like the real one.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
_NON_SPECIAL_ADDED_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
_BPE_VOCAB_SIZE = 1000
_INIT_STD = 0.08
_WORDS = (
    "the a an and or but of to in on at for with from by as is are was were be been has have had do does did "
    "not no yes this that these those it its he she they we you i me my your our their his her them us "
    "image picture photo video frame cat dog bird tree house car road river mountain sky sun moon star cloud "
    "red green blue yellow black white small large big little old new young bright dark happy quick slow "
    "describe show tell see look find count what where when why how which who many much some all any each "
    "man woman child people person hand face eye table chair book door window water food apple bread cup "
    "walk run jump sit stand eat drink read write play open close take give make know think say "
    "model server request token batch cache memory time second minute hour day week year number text answer "
    "question left right top bottom center near far above below between inside outside there here"
).split()
_EXTRA_TEXT = [
    "Hello, world! How are you today?", "The answer is 42.", "Version 2.5 costs $19.99 (about 20%).",
    "naïve café résumé façade jalapeño über straße", "Привет, как дела? Спасибо!", "你好，世界！这是一张图片。",
    "こんにちは、世界。これは写真です。", "안녕하세요 세계", "Emoji: 😀 🎉 👍 🐱 🚀 ❤️", "x = [1, 2, 3]; y = {'a': 4}",
    "def f(x):\n    return x * 2\n", "Tabs\tand\nnewlines\r\nhere.", "E = mc^2 → ∑ ∫ ≈ ≠ ∞",
]  # fmt: skip


def _corpus(rng: random.Random) -> list[str]:
    """English-like sentences from a fixed word list, plus numbers, punctuation and non-ASCII text."""
    lines = []
    for _ in range(3000):
        words = rng.choices(_WORDS, k=rng.randint(4, 14))
        words[0] = words[0].capitalize()
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 10_000)))
        lines.append(" ".join(words) + rng.choice([".", ".", "?", "!", ",", ":", ";"]))
    return lines + _EXTRA_TEXT * 20


def _build_tokenizer(special: list[str] = _SPECIAL_TOKENS, non_special: list[str] = _NON_SPECIAL_ADDED_TOKENS
                     ) -> Tokenizer:
    """Train a byte-level BPE like Qwen2's and append a family's added tokens (default Qwen2.5-VL's) in order."""
    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    # The tokenizer is independent of the weight seed so token ids are stable across checkpoints.
    tok.train_from_iterator(_corpus(random.Random(0)), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in non_special])
    return tok


def added_tokens_decoder(tok: Tokenizer, special: list[str], non_special: list[str]) -> dict:
    """tokenizer_config.json's added_tokens_decoder for a family's added tokens."""
    return {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": t in special}
            for t in special + non_special}


def make_input_sensitive(model, *, eos: int, endoftext: int) -> None:
    """Re-draws every matrix with std _INIT_STD and sets greedy generation defaults. The library's default init
    leaves logits nearly tied, so greedy output ignores the input (a parity test on it proves nothing) and flips
    on tiny batched-vs-unbatched float differences."""
    from transformers import GenerationConfig

    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, _INIT_STD)
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[eos, endoftext], pad_token_id=endoftext, do_sample=False)


def _tokenizer_config(tok: Tokenizer) -> dict:
    """tokenizer_config.json mirroring Qwen2.5-VL-Instruct's, including the chat template."""
    added = added_tokens_decoder(tok, _SPECIAL_TOKENS, _NON_SPECIAL_ADDED_TOKENS)
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": _SPECIAL_TOKENS[1:],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _preprocessor_config() -> dict:
    """preprocessor_config.json like the real model's; size duplicates the pixel bounds for transformers 5."""
    min_pixels, max_pixels = 56 * 56, 28 * 28 * 16384
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }


class Preset(NamedTuple):
    text: dict  # text_config overrides
    vision: dict  # vision_config overrides
    tie_word_embeddings: bool
    dtype: torch.dtype  # what the weights are saved in (and what `--dtype auto` runs them in where native)


_SMALL_ROPE = {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e6}

# Size presets: the tiny test model, and the real Qwen2.5-VL-3B's widths (text layers cut so CPU
# benchmarks finish; the vision tower keeps its real depth) for figures that are not only overhead.
# The test models are float32 so parity with transformers is exact; the benchmark ones are bfloat16,
# as the real checkpoints are.
PRESETS: dict[str, Preset] = {
    "tiny": Preset({}, {}, False, torch.float32),
    # The real vocabulary makes the language model's weights ~300 MB beside a ~100 KB vision tower:
    # what a process loads shows in its memory.
    "tiny-real-vocab": Preset({"vocab_size": 151936, "hidden_size": 256, "num_attention_heads": 4,
                               "rope_parameters": _SMALL_ROPE},
                              {"out_hidden_size": 256}, False, torch.float32),
    # Big enough that the stages' compute, not the router's Python, bounds a 2-core machine at a few requests
    # per second: what the SLO, overload and goodput benchmarks need to price and schedule.
    "small": Preset({"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "max_window_layers": 6,
                     "num_attention_heads": 8, "num_key_value_heads": 2, "rope_parameters": _SMALL_ROPE},
                    {"depth": 8, "hidden_size": 384, "num_heads": 6, "intermediate_size": 1024,
                     "out_hidden_size": 512, "fullatt_block_indexes": [3, 7]},
                    False, torch.bfloat16),
    "qwen2.5-vl-3b-width": Preset(
        {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 2,
         "max_window_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 2,
         "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}},
        {"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420, "out_hidden_size": 2048,
         "fullatt_block_indexes": [7, 15, 23, 31]},
        True, torch.bfloat16,
    ),
}


def build_tiny_model(out_dir: str | os.PathLike, seed: int = 0, preset: str = "tiny",
                     show_progress: bool = False, dtype: torch.dtype | None = None) -> pathlib.Path:
    """Write a random-weight Qwen2.5-VL checkpoint (config, weights, tokenizer, processor) to out_dir,
    in dtype (default: the preset's)."""
    if preset not in PRESETS:
        raise ValueError(f"preset: {preset!r} is not one of {sorted(PRESETS)}")
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=4, desc="tiny-model", unit="step", file=sys.stderr, disable=not show_progress)
    bar.set_postfix_str("tokenizer")
    tok = _build_tokenizer()
    bar.update()
    bar.set_postfix_str("weights")
    ids = {t: tok.token_to_id(t) for t in _SPECIAL_TOKENS}
    eos, endoftext = ids["<|im_end|>"], ids["<|endoftext|>"]
    vocab_size = -(-tok.get_vocab_size(with_added_tokens=True) // 64) * 64
    text_overrides, vision_overrides, tie_word_embeddings, preset_dtype = PRESETS[preset]

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "max_window_layers": 2,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
            "initializer_range": _INIT_STD,
            "bos_token_id": endoftext,
            "eos_token_id": eos,
            "pad_token_id": endoftext,
            **text_overrides,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "num_heads": 2,
            "intermediate_size": 64,
            "out_hidden_size": 64,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
            "initializer_range": _INIT_STD,
            **vision_overrides,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
        architectures=["Qwen2_5_VLForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    make_input_sensitive(model, eos=eos, endoftext=endoftext)
    model.to(dtype or preset_dtype)  # drawn in float32 either way: the same seed gives the same model, rounded
    bar.update()
    bar.set_postfix_str("save weights")
    model.save_pretrained(out, safe_serialization=True)
    bar.update()
    bar.set_postfix_str("save tokenizer")

    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tok), indent=2, ensure_ascii=False))
    (out / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(), indent=2))
    bar.update()
    bar.close()
    return out


def build_family_model(family: str, out_dir: str | os.PathLike, seed: int = 0, preset: str = "tiny",
                       dtype: torch.dtype | None = None, show_progress: bool = False) -> pathlib.Path:
    """A random-weight checkpoint of any family (qwen2_5_vl, qwen3_vl, internvl) by that family's own builder."""
    if family == "qwen2_5_vl":
        return build_tiny_model(out_dir, seed=seed, preset=preset, show_progress=show_progress, dtype=dtype)
    import importlib

    return importlib.import_module(f"mmserve.models.{family}.tiny").build(out_dir, seed=seed, preset=preset,
                                                                         dtype=dtype)
