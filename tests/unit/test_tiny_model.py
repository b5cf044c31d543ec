"""Tests for the tiny offline Qwen2.5-VL checkpoint builder."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mmserve.models import loading
from mmserve.models.tiny import CHAT_TEMPLATE, build_tiny_model

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return AutoTokenizer.from_pretrained(ckpt)


def test_loaders(ckpt, tokenizer):
    config = AutoConfig.from_pretrained(ckpt)
    assert config.model_type == "qwen2_5_vl"
    assert config.text_config.hidden_size == 64 and config.vision_config.out_hidden_size == 64
    assert config.text_config.vocab_size >= len(tokenizer)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32
    processor = Qwen2VLImageProcessorPil.from_pretrained(ckpt)
    assert (processor.size.shortest_edge, processor.size.longest_edge) == (3136, 12845056)


def test_special_token_ids_match_config(ckpt, tokenizer):
    config = AutoConfig.from_pretrained(ckpt)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        assert tokenizer.encode(token) == [token_id]
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    gen = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt).generation_config
    assert gen.eos_token_id == [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id]
    assert gen.pad_token_id == tokenizer.pad_token_id and gen.do_sample is False


def test_chat_template(tokenizer):
    assert tokenizer.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "text",
    ["Hello, world! The answer is 42.", "emoji 😀🎉👍🏽 ok", "你好，世界！日本語のテキスト", " tabs\tand\n\nnewlines  ", "Ωμέγα ∑ ≈ ∞"],
)
def test_decode_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_weights_deterministic_per_seed(ckpt, tmp_path):
    base = load_file(ckpt / "model.safetensors")
    same = load_file(build_tiny_model(tmp_path / "same", seed=0) / "model.safetensors")
    other = load_file(build_tiny_model(tmp_path / "other", seed=1) / "model.safetensors")
    assert base.keys() == same.keys() == other.keys()
    assert all(torch.equal(base[k], same[k]) for k in base)
    assert any(not torch.equal(base[k], other[k]) for k in base)
    assert {t.dtype for t in base.values()} == {torch.float32}


def test_text_only_generate(ckpt, tokenizer):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt).eval()
    messages = [{"role": "user", "content": "Tell me about the cat."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 8)
    assert torch.equal(out[0, : inputs["input_ids"].shape[1]], inputs["input_ids"][0])


def test_bfloat16_checkpoint_is_the_float32_one_rounded(ckpt, tmp_path):
    half = build_tiny_model(tmp_path / "half", seed=0, dtype=torch.bfloat16)
    base, rounded = load_file(ckpt / "model.safetensors"), load_file(half / "model.safetensors")
    assert {t.dtype for t in rounded.values()} == {torch.bfloat16}
    assert all(torch.equal(base[k].to(torch.bfloat16), rounded[k]) for k in base)
    assert AutoConfig.from_pretrained(half).dtype == torch.bfloat16


@pytest.mark.parametrize("flags, checkpoint, expected", [
    ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16, torch.bfloat16),  # Zen 4, Cooper Lake
    ({"avx2", "amx_bf16", "amx_tile"}, torch.bfloat16, torch.bfloat16),  # Sapphire Rapids
    ({"asimd", "bf16"}, torch.bfloat16, torch.bfloat16),  # Arm with the BF16 extension
    ({"avx2", "avx512f"}, torch.bfloat16, torch.float32),  # bfloat16 only emulated: slower than float32
    (set(), torch.bfloat16, torch.float32),
    ({"avx512_bf16"}, torch.float32, torch.float32),  # the checkpoint's own float32 stays
    ({"avx512_bf16"}, torch.float16, torch.float32),  # no native float16 on that CPU
    ({"avx512_fp16"}, torch.float16, torch.float16),
])
def test_auto_dtype_follows_checkpoint_where_the_cpu_computes_it(tmp_path, flags, checkpoint, expected):
    model = build_tiny_model(tmp_path / "m", dtype=checkpoint)
    cpu = torch.device("cpu")
    assert loading.resolve_dtype("auto", str(model), cpu, flags) == expected
    assert loading.resolve_dtype("float32", str(model), cpu, flags) == torch.float32  # an explicit choice wins
    assert loading.resolve_dtype("bfloat16", str(model), cpu, set()) == torch.bfloat16
