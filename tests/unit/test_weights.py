"""A stage's part of a checkpoint, as each family loads it: the same tensors as transformers' from_pretrained of the
whole model, no parameter left on the meta device, and no random init spent on real memory before the read."""

import functools
import itertools

import pytest
import torch
from transformers import (
    InternVLForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from mmserve.models import loading
from mmserve.models.family import family_of
from mmserve.models.internvl.tiny import build as build_internvl
from mmserve.models.qwen3_vl.tiny import build as build_qwen3_vl
from mmserve.models.tiny import build_tiny_model

# family: (tiny checkpoint builder, transformers' whole model, where the vision part sits in its state dict)
FAMILIES = {
    "qwen2_5_vl": (lambda out: build_tiny_model(out, seed=0), Qwen2_5_VLForConditionalGeneration, "visual."),
    "qwen3_vl": (lambda out: build_qwen3_vl(out, seed=0), Qwen3VLForConditionalGeneration, "visual."),
    "internvl": (lambda out: build_internvl(out, seed=0), InternVLForConditionalGeneration, ""),
}
INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                  "xavier_normal_", "orthogonal_")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def ckpt(request, tmp_path_factory):
    build, model_cls, vision_prefix = FAMILIES[request.param]
    path = str(build(tmp_path_factory.mktemp(request.param)))
    reference = {k.removeprefix("model."): v for k, v in model_cls.from_pretrained(path).state_dict().items()}
    return path, reference, vision_prefix


@pytest.fixture
def real_inits(monkeypatch):
    """Names of torch.nn.init functions called on a tensor that is not on the meta device."""
    seen = []

    def recording(name, original):
        @functools.wraps(original)
        def init(tensor, *args, **kwargs):
            if tensor.device.type != "meta":
                seen.append(name)
            return original(tensor, *args, **kwargs)
        return init

    for name in INIT_FUNCTIONS:
        monkeypatch.setattr(torch.nn.init, name, recording(name, getattr(torch.nn.init, name)))
    return seen


def assert_same(module: torch.nn.Module, reference: dict[str, torch.Tensor], prefix: str) -> None:
    """Every parameter and persistent buffer is the checkpoint's; nothing (non-persistent buffers included) is left
    on the meta device."""
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, reference[prefix + name]), name
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        assert tensor.device.type == "cpu", f"{name} is on {tensor.device}"


def test_vision_part_is_the_checkpoints(ckpt, real_inits):
    path, reference, prefix = ckpt
    tower = family_of(path).load_vision_tower(path)
    assert_same(tower, reference, prefix)
    assert not real_inits, f"random init ran on real memory: {sorted(set(real_inits))}"


def test_language_part_is_the_checkpoints(ckpt, real_inits):
    path, reference, _ = ckpt
    text_model, lm_head = family_of(path).load_language_model(path)
    assert_same(text_model, reference, "language_model.")
    assert torch.equal(lm_head, reference["lm_head.weight"])
    if reference["lm_head.weight"].data_ptr() == reference["language_model.embed_tokens.weight"].data_ptr():
        assert lm_head is text_model.get_input_embeddings().weight  # tied: one tensor, not a copy
    assert not real_inits, f"random init ran on real memory: {sorted(set(real_inits))}"


def test_served_family_holds_what_from_pretrained_holds_in_bfloat16(tmp_path):
    """Qwen2.5-VL (the family served end to end): parameters and buffers (rotary frequencies in float32) with
    transformers' dtypes and values, and its attention implementation."""
    path = str(build_tiny_model(tmp_path / "ckpt", seed=0))
    whole = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).model
    text_model, _ = loading.load_language_model(path, torch.bfloat16)
    tower = loading.load_vision_tower(path, torch.bfloat16)
    for ours, theirs in ((text_model, whole.language_model), (tower, whole.visual)):
        held = dict(itertools.chain(ours.named_parameters(), ours.named_buffers()))
        wanted = dict(itertools.chain(theirs.named_parameters(), theirs.named_buffers()))
        assert held.keys() == wanted.keys()
        for name, tensor in wanted.items():
            assert held[name].dtype == tensor.dtype and torch.equal(held[name], tensor), name
        assert ours.config._attn_implementation == theirs.config._attn_implementation
