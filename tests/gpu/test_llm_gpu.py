"""The LLM engine on a GPU emits the same greedy tokens as on the CPU (skipped without a GPU)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.llm.config import LlmConfig
from services.llm.engine import Engine, Finished
from services.llm.prompt import ChatMessage
from services.llm.sequence import SamplingOptions

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
