"""The LLM engine on a GPU emits the same greedy tokens as on the CPU (skipped without a GPU)."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
import torch

from services.llm import engine as engine_module
from services.llm.config import LlmConfig
from services.llm.engine import Engine, Finished
from services.llm.prompt import ChatMessage
from services.llm.sequence import SamplingOptions
from tests.integration.helpers import assert_follows

pytestmark = pytest.mark.gpu


async def _tokens(engine: Engine, prompts: list[str]) -> list[list[int]]:
    async def one(i, text):
        seq = engine.prepare(f"g{i}", [ChatMessage("user", [text])],
                             SamplingOptions(max_tokens=24, min_tokens=24, temperature=0.0))
        return [t for e in [e async for e in engine.generate(seq)] if not isinstance(e, Finished)
                for t in e.token_ids]
    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def test_cuda_engine_matches_cpu_engine(tiny_model):
    prompts = [f"Tell me about the number {i}." * (1 + i) for i in range(6)]
    results = {}
    for device in ("cpu", "cuda"):
        engine = Engine(LlmConfig(model=str(tiny_model), device=device, max_num_batched_tokens=16))
        engine.start()
        try:
            results[device] = asyncio.run(_tokens(engine, prompts))
        finally:
            engine.stop()
    assert torch.cuda.is_available()
    assert results["cuda"] == results["cpu"]


# flash-attn's paged kernels and CUDA graphs against PyTorch SDPA on the same GPU, in bfloat16. Rounding
# differs between kernels, so greedy tokens may part where two logits tie within it; before that point the
# logits must agree, and the parting must be at such a tie.
flash = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")
PROMPTS = [f"Tell me about the number {i}. " * (1 + 9 * i) for i in range(5)]  # the longest spans two 256-token pages


def _bf16_engine(model, **overrides) -> Engine:
    return Engine(LlmConfig(model=str(model), device="cuda", dtype="bfloat16", **overrides))


def _lone_runs(engine: Engine, prompts: list[str]) -> list[tuple[list[int], list[torch.Tensor]]]:
    """Each prompt alone (one row a step), with the logits every token was drawn from."""
    steps: list[torch.Tensor] = []
    original = engine_module.sample_rows

    def recording(logits, options, generators):
        steps.append(logits[0].clone())
        return original(logits, options, generators)

    engine_module.sample_rows = recording
    try:
        runs = []
        for prompt in prompts:
            steps.clear()
            tokens = asyncio.run(_tokens(engine, [prompt]))[0]
            runs.append((tokens, list(steps)))
        return runs
    finally:
        engine_module.sample_rows = original


@flash
def test_flash_paged_attention_matches_sdpa(tiny_model):
    # Prefill chunks of 16 tokens after their earlier chunks: the causal alignment over pages.
    runs = {}
    for name, overrides in {"sdpa": {"block_size": 16}, "flash": {"block_size": 256, "cuda_graphs": False}}.items():
        engine = _bf16_engine(tiny_model, max_num_batched_tokens=16, **overrides)
        assert engine.runner.flash == (name == "flash")
        engine.start()
        try:
            runs[name] = _lone_runs(engine, PROMPTS)
        finally:
            engine.stop()
    for (tokens, logits), reference in zip(runs["flash"], runs["sdpa"]):
        assert_follows(tokens, *reference, logits=logits)


@flash
def test_cuda_graph_decode_matches_eager_alone_and_padded(tiny_model):
    eager = _bf16_engine(tiny_model, cuda_graphs=False)
    eager.start()
    try:
        reference = _lone_runs(eager, PROMPTS)
    finally:
        eager.stop()
    graphed = _bf16_engine(tiny_model, max_num_seqs=12)
    assert graphed.runner.graphs is not None and graphed.runner.graphs.sizes == [1, 2, 4, 8, 12]
    graphed.start()
    try:
        alone = _lone_runs(graphed, PROMPTS)
        together = asyncio.run(_tokens(graphed, PROMPTS))  # five rows: padded to the graph of eight
        all_blocks_back = graphed.block_manager.num_free_blocks == graphed.block_manager.num_blocks
    finally:
        graphed.stop()
    for (tokens, logits), ref in zip(alone, reference):
        assert_follows(tokens, *ref, logits=logits)
    for tokens, ref in zip(together, reference):
        assert_follows(tokens, *ref)
    assert all_blocks_back
