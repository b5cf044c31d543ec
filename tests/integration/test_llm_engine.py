"""The LLM engine on a real tiny checkpoint: parity under stress, cancellation frees every block."""

from __future__ import annotations

import asyncio

import pytest
import torch
from prometheus_client import REGISTRY
from transformers import Qwen2_5_VLForConditionalGeneration

from services.llm.config import LlmConfig
from services.llm.engine import Engine, Finished
from services.llm.prompt import ChatMessage, MediaInput
from services.llm.sequence import SamplingOptions


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model).eval()


def make_engine(tiny_model, **overrides) -> Engine:
    engine = Engine(LlmConfig(model=str(tiny_model), **overrides))
    engine.start()
    return engine


def fake_image(hf_model, seed: int, grid=(1, 4, 6)) -> MediaInput:
    """Vision-tower output for random pixels: real embeddings without the decode path."""
    tower = hf_model.model.visual
    generator = torch.Generator().manual_seed(seed)
    patches = torch.randn(grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14, generator=generator)
    with torch.inference_mode():
        embeddings = tower(patches, grid_thw=torch.tensor([grid])).pooler_output
    return MediaInput("image", embeddings, grid)


def reference(hf_model, engine: Engine, seq, num_tokens: int) -> list[int]:
    """transformers' greedy generate from the same prompt ids and embeddings."""
    ids = torch.tensor([seq.token_ids[:seq.num_prompt_tokens]])
    kwargs = {}
    if seq.mm.embeddings is not None:
        embeds = hf_model.model.get_input_embeddings()(ids)
        rows = seq.mm.rows
        embeds[0, rows >= 0] = seq.mm.embeddings[rows[rows >= 0]]
        kwargs = {"inputs_embeds": embeds, "position_ids": torch.cat([
            torch.arange(ids.shape[1])[None, None], seq.mm.positions[:, None]])}
        hf_model.model.rope_deltas = torch.tensor([[seq.mm.rope_delta]])
    out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=num_tokens, min_new_tokens=num_tokens, **kwargs)
    return out[0, ids.shape[1]:].tolist()


async def run(engine: Engine, seq) -> list[int]:
    tokens = []
    async for event in engine.generate(seq):
        if not isinstance(event, Finished):
            tokens += event.token_ids
    return tokens


async def test_32_mixed_requests_with_tiny_chunks_match_transformers(tiny_model, hf_model):
    engine = make_engine(tiny_model, max_num_batched_tokens=5, block_size=4)
    try:
        seqs = []
        for i in range(32):
            words = " ".join(["word"] * (1 + 7 * i % 41))
            parts = [fake_image(hf_model, i), words] if i % 3 == 0 else [f"Request {i}: {words}"]
            options = SamplingOptions(max_tokens=4 + i % 13, min_tokens=4 + i % 13, temperature=0.0)
            seqs.append(engine.prepare(f"r{i}", [ChatMessage("user", parts)], options))
        expected = [reference(hf_model, engine, s, s.sampling.max_tokens) for s in seqs]
        results = await asyncio.gather(*(run(engine, s) for s in seqs))
        for i, (got, want) in enumerate(zip(results, expected)):
            assert got == want, f"request {i}"
    finally:
        engine.stop()


async def test_a_prompt_after_a_short_cached_prefix_matches_transformers(tiny_model, hf_model):
    """Its prefill starts after a past shorter than half of it: the runner's padded causal attention."""
    engine = make_engine(tiny_model, block_size=4)
    try:
        system = ChatMessage("system", ["Be brief."])
        options = SamplingOptions(max_tokens=8, min_tokens=8, temperature=0.0)
        await run(engine, engine.prepare("s1", [system, ChatMessage("user", ["Hello"])], options))
        second = engine.prepare("s2", [system, ChatMessage("user", [fake_image(hf_model, 3, grid=(1, 8, 8)),
                                                                     "word " * 60])], options)
        got = await run(engine, second)
        past = second.num_cached_tokens
        assert 0 < 2 * past <= second.num_prompt_tokens - past
        assert got == reference(hf_model, engine, second, 8)
    finally:
        engine.stop()


async def test_cancelling_100_requests_mid_stream_returns_every_block(tiny_model):
    engine = make_engine(tiny_model, block_size=4, kv_cache_bytes=64 * 1024 * 1024)
    try:
        total = engine.block_manager.num_blocks
        options = SamplingOptions(max_tokens=1000, temperature=1.0, seed=1)

        async def start_then_cancel(i: int) -> None:
            seq = engine.prepare(f"c{i}", [ChatMessage("user", [f"Tell me a long story number {i}."])], options)
            stream = engine.generate(seq)
            for _ in range(2):
                await anext(stream)
            await stream.aclose()  # the client went away

        await asyncio.gather(*(start_then_cancel(i) for i in range(100)))
        # A request queued after the aborts finishes only after the engine processed them.
        last = engine.prepare("last", [ChatMessage("user", ["Hi"])], SamplingOptions(max_tokens=2))
        await run(engine, last)
        assert engine.block_manager.num_free_blocks == total
        assert not engine.scheduler.has_work
    finally:
        engine.stop()


async def test_shared_prefix_and_repeated_image_are_served_from_the_prefix_cache(tiny_model, hf_model):
    engine = make_engine(tiny_model, block_size=4)
    try:
        picture = fake_image(hf_model, 99)
        system = ChatMessage("system", ["You are a careful assistant who answers in one short sentence. " * 4])
        options = SamplingOptions(max_tokens=8, min_tokens=8, temperature=0.0)
        first = engine.prepare("p1", [system, ChatMessage("user", [picture, "What is this?"])], options)
        await run(engine, first)
        second = engine.prepare("p2", [system, ChatMessage("user", [picture, "Where is it?"])], options)
        got = await run(engine, second)
        image_end = second.media_spans[0][1]
        assert second.num_cached_tokens >= image_end - 4, "system prompt and image KV are reused"
        assert got == reference(hf_model, engine, second, 8)
        other = engine.prepare("p3", [system, ChatMessage("user", [fake_image(hf_model, 7), "Where is it?"])],
                               options)
        await run(engine, other)
        assert other.num_cached_tokens < other.media_spans[0][0] + 4, "another image must not hit"
    finally:
        engine.stop()


async def test_same_seed_same_output_and_sampling_options_apply(tiny_model):
    engine = make_engine(tiny_model)
    try:
        def sampled(name: str, seed: int, **options):
            opts = SamplingOptions(max_tokens=24, min_tokens=24, temperature=1.0, seed=seed, **options)
            return engine.prepare(name, [ChatMessage("user", ["Once upon a time"])], opts)

        a, b, c = await asyncio.gather(run(engine, sampled("a", 5)), run(engine, sampled("b", 5)),
                                       run(engine, sampled("c", 6)))
        assert a == b, "same seed, same tokens, even while batched with others"
        assert a != c
        top1 = await run(engine, sampled("k", 9, top_k=1))
        greedy = await run(engine, engine.prepare("g", [ChatMessage("user", ["Once upon a time"])],
                                                  SamplingOptions(max_tokens=24, min_tokens=24, temperature=0.0)))
        assert top1 == greedy, "top_k=1 is greedy whatever the temperature"
    finally:
        engine.stop()


async def test_full_queue_is_refused(tiny_model):
    from services.llm.engine import EngineOverloaded

    engine = make_engine(tiny_model, max_num_seqs=1, max_queue=1)
    try:
        long = SamplingOptions(max_tokens=2000, temperature=1.0)
        hello = [ChatMessage("user", ["hi"])]
        running = engine.generate(engine.prepare("q0", hello, long))
        await anext(running)
        queued = asyncio.ensure_future(anext(engine.generate(engine.prepare("q1", hello, long))))
        await asyncio.sleep(0)  # lets it register and wait behind the running one
        with pytest.raises(EngineOverloaded):
            await anext(engine.generate(engine.prepare("q2", hello, long)))
        queued.cancel()
        await running.aclose()
    finally:
        engine.stop()


async def test_finished_reports_the_batch_its_tokens_were_made_in(tiny_model):
    """What the router fits its decode-step cost on: alone every step is batch 1; started together, mostly 2
    (the second may join a step late, and then makes its last token alone)."""
    engine = make_engine(tiny_model)
    try:
        options = SamplingOptions(max_tokens=6, min_tokens=6, temperature=0.0)

        async def final(name: str) -> Finished:
            return [e async for e in engine.generate(engine.prepare(name, [ChatMessage("user", ["hi"])], options))][-1]

        assert (await final("alone")).decode_batch == 1.0
        assert all(1.0 < f.decode_batch <= 2.0 for f in await asyncio.gather(final("a"), final("b")))
    finally:
        engine.stop()


async def test_a_consumer_that_falls_behind_gets_the_tokens_made_meanwhile_in_fewer_deltas(tiny_model):
    engine = make_engine(tiny_model)
    try:
        options = SamplingOptions(max_tokens=12, min_tokens=12, temperature=0.0)
        prompt = [ChatMessage("user", ["Once upon a time"])]
        expected = await run(engine, engine.prepare("fast", prompt, options))
        events = engine.generate(engine.prepare("slow", prompt, options))
        first = await anext(events)
        await asyncio.sleep(0.5)  # the engine makes the next tokens (a few ms each) while nobody reads them
        rest = [e async for e in events]
        deltas = [first, *rest[:-1]]
        assert [t for d in deltas for t in d.token_ids] == expected and isinstance(rest[-1], Finished)
        assert len(first.token_ids) == 1 and len(deltas) < len(expected)
        assert "".join(d.text for d in deltas) == engine.tokenizer.decode(expected)
    finally:
        engine.stop()


async def test_the_occupancy_gauges_count_a_request_out_before_its_final_is_sent(tiny_model):
    """What an operator (and the drain test) reads right after a final: no stale running sequence."""
    engine = make_engine(tiny_model)
    send, seen = engine._send, []

    def recording(events):
        if any(isinstance(event, Finished) for _, event in events):
            seen.append(REGISTRY.get_sample_value("mmserve_llm_running_sequences"))
        send(events)

    engine._send = recording
    try:
        options = SamplingOptions(max_tokens=3, min_tokens=3, temperature=0.0)
        await run(engine, engine.prepare("one", [ChatMessage("user", ["hi"])], options))
        assert seen == [0.0]
    finally:
        engine.stop()


@pytest.mark.parametrize("tpot_ms, shaped", [(0.001, True), (0.0, False)])
async def test_a_prompt_beside_a_decode_behind_its_target_advances_by_the_minimum_and_both_match_transformers(
        tiny_model, hf_model, tpot_ms, shaped):
    """A decode with a time-per-token target it cannot meet leaves a prompt beside it min_prefill_tokens a step;
    without a target the prompt takes one step. Either way the tokens are transformers'."""
    engine = make_engine(tiny_model, min_prefill_tokens=16)
    try:
        options = SamplingOptions(max_tokens=48, min_tokens=48, temperature=0.0)
        first = engine.prepare("decoding", [ChatMessage("user", ["Count to forty."])], options, tpot_ms=tpot_ms)
        second = engine.prepare("prompt", [ChatMessage("user", ["word " * 150])], options)
        assert first.tpot_ms == tpot_ms and second.num_prompt_tokens > 150
        expected = [reference(hf_model, engine, s, 48) for s in (first, second)]
        decoded: list[int] = []

        async def decode() -> list[int]:
            async for event in engine.generate(first):
                if not isinstance(event, Finished):
                    decoded.extend(event.token_ids)
            return decoded

        decoding = asyncio.create_task(decode())
        while not decoded:
            await asyncio.sleep(0.001)
        stream = engine.generate(second)
        got = (await anext(stream)).token_ids
        num_beside = len(decoded)  # the decode's tokens by the prompt's first: one per step of its prefill
        got += [t for event in [e async for e in stream] if not isinstance(event, Finished) for t in event.token_ids]
        assert [await decoding, got] == expected
        num_steps = -(-second.num_prompt_tokens // 16)
        assert num_steps >= 10
        # (a token or two of slack: the decode's consumer may not have run when the prompt's first token came)
        if shaped:
            assert num_beside >= num_steps - 2, "the prompt advanced 16 tokens a step beside the decode"
        else:
            assert num_beside <= 4, "the prompt took one step"
        assert engine.step_budget.model.num_updates > 48, "every step taught the time model"
    finally:
        engine.stop()
