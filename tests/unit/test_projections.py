"""A layer's projections as the llm runs them (q, k, v in one matmul; gate and up in one; packed on a CPU with
bfloat16): the same numbers as the model's own linears, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmserve.models import loading
from services.llm import projections as projections_module
from services.llm.block_manager import BlockManager
from services.llm.projections import LayerProjections, fuse, output_projection, packs_exactly
from services.llm.prompt import MultimodalPrompt
from services.llm.runner import ModelRunner
from services.llm.scheduler import ScheduledChunk
from services.llm.sequence import SamplingOptions, Sequence


def test_fused_projections_equal_the_separate_ones_bit_for_bit_and_share_their_weights(tiny_model):
    text_model, _ = loading.load_language_model(str(tiny_model))
    layer = text_model.layers[0]
    x = torch.randn(5, text_model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    attn, mlp = layer.self_attn, layer.mlp
    before = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), mlp.gate_proj(x), mlp.up_proj(x)]
    qkv, gate_up = fuse([attn.q_proj, attn.k_proj, attn.v_proj]), fuse([mlp.gate_proj, mlp.up_proj])
    assert qkv.bias is not None  # Qwen2.5-VL's q, k and v have biases: fused too
    for got, want in zip([*qkv(x), *gate_up(x)], before):
        assert torch.equal(got, want)
    # The modules' parameters are views of the fused weight: no second copy, and they still compute the same.
    for module in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert module.weight.untyped_storage().data_ptr() == qkv.weight.untyped_storage().data_ptr()
        assert module.bias.untyped_storage().data_ptr() == qkv.bias.untyped_storage().data_ptr()
    assert torch.equal(attn.v_proj(x), before[2])


def test_what_cannot_share_one_weight_is_left_alone():
    assert fuse([nn.Linear(4, 4, bias=True), nn.Linear(4, 4, bias=False)]) is None
    assert fuse([nn.Linear(4, 4), nn.Linear(4, 4).to(torch.bfloat16)]) is None
    assert fuse([nn.Linear(4, 4), nn.Linear(3, 4)]) is None
    assert fuse([nn.Bilinear(4, 4, 4)]) is None


def _prefill_logits(runner: ModelRunner, num_tokens: int = 10) -> torch.Tensor:
    mm = MultimodalPrompt(None, None, torch.arange(num_tokens).expand(3, -1), 0)
    seq = Sequence("a", [(7 * i + 3) % 100 for i in range(num_tokens)], SamplingOptions(), mm=mm,
                   num_prompt_tokens=num_tokens, num_computed_tokens=0, block_table=[3, 8, 1])
    return runner.run([ScheduledChunk(seq, num_tokens)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_with_the_runner_s_projections_gives_the_model_s_own_linears_logits(tiny_model, monkeypatch, dtype):
    """bfloat16 on a CPU with it in hardware: fused and packed; float32: fused, plain."""
    def runner() -> ModelRunner:
        text_model, lm_head = loading.load_language_model(str(tiny_model), dtype=dtype)
        return ModelRunner(text_model, lm_head, BlockManager(num_blocks=16, block_size=4), dtype)

    ours = runner()
    first = ours.projections[0]
    assert all([first.qkv, first.o, first.gate_up, first.down])
    packed = {p.weight.is_mkldnn for p in (first.qkv, first.o, first.gate_up, first.down, ours.head)}
    assert packed == {packs_exactly(dtype)}
    monkeypatch.setattr(projections_module, "packs_exactly", lambda dtype: False)
    reference = runner()  # plain weights; and the model's own linears, not fused ones:
    reference.projections = [LayerProjections(None, None, None, None)] * len(reference.projections)
    assert torch.equal(_prefill_logits(ours), _prefill_logits(reference))


@pytest.mark.skipif(not packs_exactly(torch.bfloat16), reason="this CPU packs no bfloat16 weights")
def test_a_tied_lm_head_stays_plain():
    """Tied, the lm_head is the input embeddings, which the lookup reads plain: packing would copy it."""
    embeddings = torch.randn(64, 16).to(torch.bfloat16)
    assert not output_projection(embeddings, embeddings, torch.device("cpu")).weight.is_mkldnn
    lm_head = torch.randn(64, 16).to(torch.bfloat16)
    head = output_projection(lm_head, embeddings, torch.device("cpu"))
    assert head.weight.is_mkldnn
    x = torch.randn(3, 16).to(torch.bfloat16)
    assert torch.equal(head(x), x @ lm_head.T)
