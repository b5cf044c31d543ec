"""Prefill as media arrives, in the engine: a video planned up front and handed over in chunks out of order, with
engine steps in between, gives the same greedy tokens as all of it at once and as transformers' generate; the text
before it is prefilled before any chunk; a sequence waiting for a chunk holds back no one; an abandoned or failed one
frees every block and chunk; the prefix cache knows a streamed video by its digest."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

from mmserve.models.family import EncodedItem, MediaItem, family_of, pack, unpack
from mmserve.models.qwen3_vl.tiny import build as build_qwen3_vl
from services.llm.engine import Engine, Finished
from services.llm.prompt import ChatMessage, MediaInput
from services.llm.sequence import SamplingOptions
from tests.integration.test_llm_engine import make_engine
from tests.unit.family_parity import hf_generate_inputs

NUM_TOKENS = 10
GREEDY = SamplingOptions(max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS, temperature=0.0)
ORDERS = {4: [2, 0, 3, 1], 7: [3, 0, 6, 1, 2, 5, 4]}  # the order chunks finish in across encoder replicas


@dataclasses.dataclass(frozen=True)
class Video:
    """A video's whole encoded item and how the plan cuts it into chunks."""

    encoded: EncodedItem
    grid: tuple[int, int, int]
    second_per_grid_t: float = 0.0
    timestamps: tuple[float, ...] = ()

    def whole(self) -> MediaInput:
        return MediaInput("video", self.encoded.embeddings, self.grid, self.second_per_grid_t, self.timestamps,
                          self.encoded.deepstack)

    def planned(self, num_chunks: int, digest: str = "") -> MediaInput:
        groups = np.array_split(np.arange(self.grid[0]), num_chunks)  # whole temporal groups, as the encoder cuts
        per_group = self.encoded.embeddings.shape[0] // self.grid[0]
        return MediaInput("video", None, self.grid, self.second_per_grid_t, self.timestamps,
                          chunk_rows=tuple(len(g) * per_group for g in groups), digest=digest)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A tiny checkpoint, its family, its vision tower and transformers' whole model (the reference)."""

    path: str
    family: object
    tower: torch.nn.Module
    hf: torch.nn.Module

    def video(self, seed: int) -> tuple[Video, torch.Tensor]:
        """A random clip's video as the encoder makes it (at least 7 temporal groups), and its pixels."""
        rng = np.random.default_rng(seed)
        if self.family.name == "qwen2_5_vl":  # frames as the decoder resizes them: 14 frames, 56 x 84
            frames, indices = rng.integers(0, 256, (14, 1, 1, 3)) + rng.integers(-20, 21, (14, 56, 84, 3)), range(14)
        else:
            frames = rng.integers(0, 256, (32, 1, 1, 3)) + rng.integers(-20, 21, (32, 96, 128, 3))
            indices = self.family.sample_frames(32, 2.0)
        frames = torch.from_numpy(np.clip(frames, 0, 255).astype(np.uint8))[list(indices)]
        pixels, item = self.family.preprocess_video(frames, list(indices), 2.0)
        encoded = self.family.encode(self.tower, pixels, [item])[0]
        assert item.grid[0] >= 7 and encoded.embeddings.shape[0] == self.family.num_tokens(item)
        return Video(encoded, item.grid, item.second_per_grid_t, item.timestamps), pixels

    @torch.inference_mode()
    def generate(self, seq, video: Video, pixels: torch.Tensor) -> list[int]:
        """transformers' greedy generate on the same prompt ids and pixels."""
        prompt = seq.token_ids[:seq.num_prompt_tokens]
        item = MediaItem("video", video.grid, video.timestamps, video.second_per_grid_t)
        if self.family.name == "qwen3_vl":
            inputs = hf_generate_inputs(self.family, prompt, [(pixels, item)])
        else:  # Qwen2.5-VL: as its processor makes them (M-RoPE needs the token types, and the seconds per group)
            ids = torch.tensor([prompt])
            inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                          mm_token_type_ids=(ids == self.family.video_token_id).int() * 2,
                          pixel_values_videos=pixels, video_grid_thw=torch.tensor([video.grid]),
                          second_per_grid_ts=torch.tensor([video.second_per_grid_t]))
        out = self.hf.generate(**inputs, do_sample=False, max_new_tokens=NUM_TOKENS, min_new_tokens=NUM_TOKENS)
        return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def checkpoint(request, tiny_model, tmp_path_factory) -> Checkpoint:
    if request.param == "qwen2_5_vl":
        path, model_class = str(tiny_model), Qwen2_5_VLForConditionalGeneration
    else:
        path, model_class = str(build_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl"), seed=0, preset="tiny")), \
            Qwen3VLForConditionalGeneration
    family = family_of(path)
    return Checkpoint(path, family, family.load_vision_tower(path), model_class.from_pretrained(path).eval())


@pytest.fixture(scope="module")
def qwen25(tiny_model) -> Checkpoint:
    family = family_of(tiny_model)
    return Checkpoint(str(tiny_model), family, family.load_vision_tower(str(tiny_model)), None)


def conversation(video: MediaInput, question: str = "What happens?") -> list[ChatMessage]:
    return [ChatMessage("system", ["You are a careful assistant who answers in one short sentence."]),
            ChatMessage("user", ["Watch this:", video, question])]


async def wait_until(predicate, timeout_s: float = 120.0) -> None:
    """Waits (polling) for the engine thread to reach a state; fails after timeout_s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "the engine did not get there"
        await asyncio.sleep(0.002)


async def tokens_of(events) -> list[int]:
    return [t for event in [e async for e in events] if not isinstance(event, Finished) for t in event.token_ids]


def chunk(seq, video: Video, index: int, hidden_size: int) -> EncodedItem:
    """Chunk index (prompt order) of video as the servicer hands it over: packed on the wire, unpacked."""
    starts = seq.mm.streamed.starts
    return unpack(pack(video.encoded.rows(starts[index], starts[index + 1])), hidden_size)


async def stream(engine: Engine, seq, video: Video, order: list[int]) -> list[int]:
    """Runs a planned sequence, handing over its chunks in order, each after prefill caught up with the last; checks
    that prefill stops at the first missing chunk and that only arrived, unconsumed chunks are held."""
    media = seq.mm.streamed
    result = asyncio.ensure_future(tokens_of(engine.generate(seq)))
    video_start = seq.media_spans[0][0]
    await wait_until(lambda: seq.num_computed_tokens == video_start)  # the text before the video, no chunk yet
    for i, index in enumerate(order):
        engine.put_chunk(seq, index, chunk(seq, video, index, engine.hidden_size))
        await wait_until(lambda: index not in seq.pending_media)
        if not seq.pending_media:
            break
        await wait_until(lambda: seq.is_waiting_for_media)
        first_missing = min(seq.pending_media)
        assert seq.num_computed_tokens == media.token_span(first_missing)[0], "prefill up to the first missing row"
        held = [j for j in order[:i + 1] if j > first_missing]
        assert media.num_held_chunks == len(held), "prefilled chunks are freed, arrived later ones held"
    tokens = await result
    assert media.num_held_chunks == 0
    return tokens


@pytest.mark.parametrize("num_chunks", [4, 7])
async def test_a_video_in_chunks_out_of_order_equals_all_at_once_and_transformers(checkpoint, num_chunks):
    """Qwen2.5-VL (M-RoPE time axis) and Qwen3-VL (DeepStack columns, timestamps in the prompt)."""
    video, pixels = checkpoint.video(seed=num_chunks)
    engine = make_engine(checkpoint.path, block_size=4, max_num_batched_tokens=16)  # chunked prefill cuts chunks
    try:
        whole = engine.prepare("whole", conversation(video.whole()), GREEDY)
        expected = checkpoint.generate(whole, video, pixels)
        assert await tokens_of(engine.generate(whole)) == expected
        streamed = engine.prepare("streamed", conversation(video.planned(num_chunks)), GREEDY)
        assert streamed.token_ids == whole.token_ids[:whole.num_prompt_tokens]
        assert await stream(engine, streamed, video, ORDERS[num_chunks]) == expected
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    finally:
        engine.stop()


async def test_a_sequence_waiting_for_a_chunk_holds_back_no_decode(qwen25):
    engine = make_engine(qwen25.path, block_size=4)
    try:
        video, _ = qwen25.video(seed=1)
        waiting = engine.prepare("waiting", conversation(video.planned(4)), GREEDY)
        result = asyncio.ensure_future(tokens_of(engine.generate(waiting)))
        await wait_until(lambda: waiting.is_waiting_for_media)
        assert waiting.num_computed_tokens == waiting.media_spans[0][0], "its text prefilled before any chunk"
        idle_steps = engine.num_idle_steps
        options = SamplingOptions(max_tokens=24, min_tokens=24, temperature=0.0)
        events = [e async for e in engine.generate(engine.prepare("talker", [ChatMessage("user", ["Hi"])], options))]
        assert sum(len(e.token_ids) for e in events[:-1]) == 24
        assert events[-1].decode_batch == 1.0, "every decode step ran at once, without the waiting sequence"
        assert waiting.is_waiting_for_media and waiting.block_table, "it keeps its blocks"
        assert waiting.num_computed_tokens == waiting.media_spans[0][0]
        # Nothing to run: the engine loop sleeps until news, it does not spin over the waiting sequence.
        await asyncio.sleep(0.2)
        assert engine.num_idle_steps - idle_steps <= 3
        for index in range(4):
            engine.put_chunk(waiting, index, chunk(waiting, video, index, engine.hidden_size))
        assert len(await result) == NUM_TOKENS
    finally:
        engine.stop()


@pytest.mark.parametrize("how", ["client_gone", "chunk_failed"])
async def test_an_abandoned_stream_frees_every_block_and_chunk_and_the_next_request_is_served(qwen25, how):
    engine = make_engine(qwen25.path, block_size=4)
    try:
        free = engine.block_manager.num_free_blocks
        video, _ = qwen25.video(seed=2)
        seq = engine.prepare("abandoned", conversation(video.planned(4)), GREEDY)
        result = asyncio.ensure_future(tokens_of(engine.generate(seq)))
        for index in (0, 2):
            engine.put_chunk(seq, index, chunk(seq, video, index, engine.hidden_size))
        await wait_until(lambda: 2 not in seq.pending_media and seq.is_waiting_for_media)
        assert seq.num_computed_tokens == seq.mm.streamed.token_span(1)[0] and seq.mm.streamed.num_held_chunks == 1
        assert engine.block_manager.num_free_blocks < free
        if how == "client_gone":
            result.cancel()
        else:
            engine.fail(seq, ValueError("chunk.embeddings: not the planned shape"))
        with pytest.raises(asyncio.CancelledError if how == "client_gone" else ValueError):
            await result
        engine.put_chunk(seq, 1, chunk(seq, video, 1, engine.hidden_size))  # a late chunk is dropped
        after = engine.prepare("after", [ChatMessage("user", ["Hi"])], SamplingOptions(max_tokens=2))
        assert len(await tokens_of(engine.generate(after))) == 2
        assert engine.block_manager.num_free_blocks == free
        assert seq.mm.streamed.num_held_chunks == 0 and not engine.scheduler.has_work
    finally:
        engine.stop()


async def test_the_prefix_cache_knows_a_streamed_video_by_its_digest(qwen25):
    engine = make_engine(qwen25.path, block_size=4)
    try:
        video, _ = qwen25.video(seed=3)
        first = engine.prepare("first", conversation(video.planned(4, digest="clip-A")), GREEDY)
        await stream(engine, first, video, [0, 1, 2, 3])
        second = engine.prepare("second", conversation(video.planned(4, digest="clip-A"), "Where is it?"), GREEDY)
        result = asyncio.ensure_future(tokens_of(engine.generate(second)))
        video_end = second.media_spans[0][1]
        await wait_until(lambda: second.num_computed_tokens >= video_end - 4)  # from the cache, before any chunk
        assert second.num_cached_tokens >= video_end - 4
        for index in reversed(range(4)):  # the router still sends them all; those before the cached prefix are dropped
            engine.put_chunk(second, index, chunk(second, video, index, engine.hidden_size))
        whole = engine.prepare("whole", conversation(video.whole(), "Where is it?"), GREEDY)
        assert await result == await tokens_of(engine.generate(whole))  # all at once, proved equal to transformers
        assert second.mm.streamed.num_held_chunks == 0
        other = engine.prepare("other", conversation(video.planned(4, digest="clip-B"), "Where is it?"), GREEDY)
        other_result = asyncio.ensure_future(tokens_of(engine.generate(other)))
        await wait_until(lambda: other.is_waiting_for_media)
        assert other.num_cached_tokens < other.media_spans[0][0] + 4, "another digest must not hit"
        other_result.cancel()
    finally:
        engine.stop()
