"""A step's decodes as one batch: each sequence's slot, positions and attention equal what it would get alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmserve.models import loading
from services.llm.block_manager import BlockManager
from services.llm.prompt import MultimodalPrompt
from services.llm.runner import ModelRunner
from services.llm.scheduler import ScheduledChunk
from services.llm.sequence import SamplingOptions, Sequence


def decoding(name: str, num_tokens: int, block_table: list[int], rope_delta: int) -> Sequence:
    """A sequence whose every token but the last has KV: its next step is a decode of that token."""
    mm = MultimodalPrompt(None, None, torch.zeros(3, 1, dtype=torch.long), rope_delta)
    return Sequence(name, list(range(num_tokens)), SamplingOptions(), mm=mm, num_prompt_tokens=1,
                    num_computed_tokens=num_tokens - 1, block_table=block_table)


def test_batched_decode_metadata_and_attention_equal_each_sequence_alone(tiny_model):
    text_model, lm_head = loading.load_language_model(str(tiny_model))
    block_manager = BlockManager(num_blocks=16, block_size=4)
    runner = ModelRunner(text_model, lm_head, block_manager, torch.float32)
    generator = torch.Generator().manual_seed(0)
    runner.k_cache.copy_(torch.randn(runner.k_cache.shape, generator=generator))
    runner.v_cache.copy_(torch.randn(runner.v_cache.shape, generator=generator))
    # Contexts of 3, 10 and 7 tokens over scattered blocks: the batch pads to 10.
    seqs = [decoding("a", 3, [5], 0), decoding("b", 10, [9, 2, 14], 7), decoding("c", 7, [1, 11], -2)]
    batch = runner._prepare([ScheduledChunk(s, 1) for s in seqs])
    assert batch.slots.tolist() == [block_manager.slot(s, s.num_computed_tokens) for s in seqs]
    assert batch.positions.tolist() == [[s.num_computed_tokens + s.mm.rope_delta for s in seqs]] * 3
    q = torch.randn(len(seqs), runner.num_heads, runner.head_dim, generator=generator)
    out = runner._sdpa_attend(q, 1, batch)
    k_cache, v_cache = runner.k_cache[1], runner.v_cache[1]  # [kv heads, slots, head_dim]
    for row, seq in enumerate(seqs):
        context = torch.tensor([block_manager.slot(seq, p) for p in range(seq.num_computed_tokens + 1)])
        alone = F.scaled_dot_product_attention(q[row][:, None], k_cache[:, context], v_cache[:, context],
                                               scale=runner.scale, enable_gqa=True)[:, 0]
        torch.testing.assert_close(out[row], alone)


def test_a_lone_decode_attends_as_it_would_in_a_batch(tiny_model):
    """Alone, a decoding sequence takes SDPA's kernel (no padding to mask); in a batch, the padded matmuls."""
    text_model, lm_head = loading.load_language_model(str(tiny_model))
    runner = ModelRunner(text_model, lm_head, BlockManager(num_blocks=16, block_size=4), torch.float32)
    generator = torch.Generator().manual_seed(1)
    runner.k_cache.copy_(torch.randn(runner.k_cache.shape, generator=generator))
    runner.v_cache.copy_(torch.randn(runner.v_cache.shape, generator=generator))
    lone, other = decoding("a", 7, [5, 2], 0), decoding("b", 10, [9, 3, 14], 0)
    q = torch.randn(2, runner.num_heads, runner.head_dim, generator=generator)
    alone = runner._sdpa_attend(q[:1], 1, runner._prepare([ScheduledChunk(lone, 1)]))
    batched = runner._sdpa_attend(q, 1, runner._prepare([ScheduledChunk(lone, 1), ScheduledChunk(other, 1)]))
    torch.testing.assert_close(alone, batched[:1])
