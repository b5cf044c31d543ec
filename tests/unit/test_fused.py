"""Fused projections (q, k, v in one matmul; an MLP's gate and up in one): the same numbers as the separate ones."""

from __future__ import annotations

import torch
from torch import nn

from mmserve.models import loading
from services.llm.block_manager import BlockManager
from services.llm.fused import fuse, fuse_attention, fuse_mlp
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
    qkv, gate_up = fuse_attention(attn), fuse_mlp(mlp)
    assert qkv.bias is not None  # Qwen2.5-VL's q, k and v have biases: fused too
    for got, want in zip([*qkv(x), *gate_up(x)], before):
        assert torch.equal(got, want)
    # The modules' parameters are views of the fused weight: no second copy, and they still compute the same.
    for module in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert module.weight.untyped_storage().data_ptr() == qkv.weight.untyped_storage().data_ptr()
        assert module.bias.untyped_storage().data_ptr() == qkv.bias.untyped_storage().data_ptr()
    assert torch.equal(attn.v_proj(x), before[2])


def test_what_cannot_share_one_weight_is_left_alone():
    class Experts(nn.Module):  # a mixture of experts: no gate_proj / up_proj of its own
        act_fn = nn.SiLU()

    assert fuse_mlp(Experts()) is None
    assert fuse([nn.Linear(4, 4, bias=True), nn.Linear(4, 4, bias=False)]) is None
    assert fuse([nn.Linear(4, 4), nn.Linear(4, 4).to(torch.bfloat16)]) is None
    assert fuse([nn.Linear(4, 4), nn.Linear(3, 4)]) is None


def test_a_step_with_fused_projections_gives_the_unfused_step_s_logits(tiny_model):
    text_model, lm_head = loading.load_language_model(str(tiny_model))
    runner = ModelRunner(text_model, lm_head, BlockManager(num_blocks=16, block_size=4), torch.float32)
    num_tokens = 10
    mm = MultimodalPrompt(None, None, torch.arange(num_tokens).expand(3, -1), 0)
    seq = Sequence("a", [(7 * i + 3) % 100 for i in range(num_tokens)], SamplingOptions(), mm=mm,
                   num_prompt_tokens=num_tokens, num_computed_tokens=0, block_table=[3, 8, 1])
    fused = runner.run([ScheduledChunk(seq, num_tokens)])
    num_layers = len(text_model.layers)
    assert all(runner.qkv) and all(runner.gate_up)
    runner.qkv, runner.gate_up = [None] * num_layers, [None] * num_layers  # the modules' own projections
    assert torch.equal(runner.run([ScheduledChunk(seq, num_tokens)]), fused)
