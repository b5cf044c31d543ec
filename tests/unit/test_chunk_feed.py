"""The router's chunk feed (streamed prefill) over doubles of the decoder, encoder and llm stubs: what the llm is
sent, what the decoder is asked for, the in-flight cap, a lost encoder, and what a failure releases."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest

from mmserve.cache import CachedEmbedding
from mmserve.cache_keys import MediaParams
from mmserve.media.fetch import FetchPolicy
from mmserve.models.family import DecodePlan, MediaItem
from mmserve.models.qwen2_5_vl import from_defaults
from mmserve.v1 import decoder_pb2, encoder_pb2, llm_pb2, tensor_pb2
from services.router import streamed
from services.router.costs import CostSeeds, DecodeCost, MediaShape, TokenCost
from services.router.media import MediaItem as RouterItem
from services.router.media import MediaStage, Prepared
from services.router.planning import plan_chunks
from services.router.replicas import Replica, ReplicaPool
from services.router.streamed import ChunkFeed, FeedFailed, StreamLost

FAMILY = from_defaults()
NUM_FRAMES = 12  # 6 temporal groups: 3 windows of 4 frames


def remote(handle: str, rows: int = 1) -> tensor_pb2.TensorRef:
    return tensor_pb2.TensorRef(dtype="float32", shape=[rows, 64],
                                remote=tensor_pb2.RemoteRef(address="producer:1", handle_id=handle))


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "test")


class DecodeStream:
    def __init__(self, chunks, fail_after: int | None):
        self.chunks, self.fail_after, self.is_cancelled = chunks, fail_after, False

    def __aiter__(self):
        return self._messages()

    async def _messages(self):
        for n, chunk in enumerate(self.chunks):
            if n == self.fail_after:
                raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT)
            await asyncio.sleep(0)
            yield chunk

    def cancel(self):
        self.is_cancelled = True


class Decoder:
    """Decodes the windows it is asked for, in order (all of them when chunk_indices is empty)."""

    def __init__(self, fail_after: int | None = None):
        self.requests: list[decoder_pb2.DecodeRequest] = []
        self.streams: list[DecodeStream] = []
        self.fail_after = fail_after

    def Decode(self, request, timeout, metadata):
        self.requests.append(request)
        indices = list(request.chunk_indices) or list(range(NUM_FRAMES // request.chunk_frames))
        chunks = [decoder_pb2.DecodeChunk(
            chunk_index=i, num_chunks=NUM_FRAMES // request.chunk_frames,
            frames=remote(f"frames-{i}-{len(self.requests)}"), sample_fps=2.0, video_fps=30.0,
            frame_indices=range(i * request.chunk_frames, (i + 1) * request.chunk_frames)) for i in indices]
        self.streams.append(DecodeStream(chunks, self.fail_after))
        return self.streams[-1]


class Encoder:
    """Encodes a chunk after a delay that makes later chunks finish first; fails the chunks in fail once."""

    def __init__(self, fail: set[int] = frozenset(), block: set[int] = frozenset()):
        self.fail, self.block = set(fail), block
        self.num_calls = 0

    async def _encode(self, request):
        self.num_calls += 1
        index = request.cache.chunk_index
        await asyncio.sleep(0.001 * (5 - index))
        if index in self.block:
            await asyncio.Event().wait()  # until cancelled
        if index in self.fail:
            self.fail.discard(index)
            raise rpc_error(grpc.StatusCode.UNAVAILABLE)
        return encoder_pb2.EncodeResponse(embeddings=remote(f"emb-{index}", 48), grid_thw=[2, 8, 12], encode_ms=1)

    def Encode(self, request, timeout, metadata):
        return self._encode(request)


class Llm:
    """GenerateStreamed's double: records what it is sent and answers once the input is closed."""

    def __init__(self):
        self.inputs: list[llm_pb2.LlmInput] = []
        self.closed = asyncio.Event()
        self.is_cancelled = False

    def GenerateStreamed(self, timeout):
        return self

    async def initial_metadata(self):  # the llm queued the request
        return ()

    def done(self):
        return self.is_cancelled

    async def write(self, message):
        self.inputs.append(message)

    async def done_writing(self):
        self.closed.set()

    def cancel(self):
        self.is_cancelled = True
        self.closed.set()

    def __aiter__(self):
        return self._replies()

    async def _replies(self):
        await self.closed.wait()
        if self.is_cancelled:
            raise asyncio.CancelledError()
        yield llm_pb2.LlmResponse(final=llm_pb2.LlmFinal(finish_reason="stop"))


class Cache:
    def __init__(self, entries: dict[str, CachedEmbedding]):
        self.entries = entries

    async def get_many(self, keys, header_only=False):
        return [self.entries.get(k) for k in keys]


def pool(stage: str, stub, costs, num_replicas: int = 1) -> ReplicaPool:
    replicas = ReplicaPool(stage, stub_class=None, max_message_bytes=0, make_costs=lambda: costs, policy="slo",
                           max_in_flight=8, unhealthy_wait_s=0.01)
    for i in range(num_replicas):
        replicas.replicas[f"r{i}"] = Replica(f"r{i}", channel=None, stub=stub, costs=costs, healthy=True)
    return replicas


def make_feed(decoder, encoder, *, cached: tuple[int, ...] = (), max_in_flight: int = 2, **kwargs):
    """A feed of one 12-frame video in windows of 4 frames (3 chunks), the cached ones in a fake cache."""
    plan = DecodePlan(NUM_FRAMES, 112, 168, MediaItem("video", (6, 8, 12), second_per_grid_t=1.0),
                      tuple(range(NUM_FRAMES)))
    chunks = plan_chunks(plan, FAMILY, 4)
    prepared = Prepared(RouterItem("video", None, "messages[0].parts[0].video"), b"clip", "digest", "model",
                        MediaParams("video", fps=2.0), shape=MediaShape(NUM_FRAMES, NUM_FRAMES * 112 * 168, 6 * 96 * 4),
                        planned=MediaShape(NUM_FRAMES, NUM_FRAMES * 112 * 168, 6 * 96 * 4), planned_item=plan.item,
                        chunks=chunks, cached_chunks=cached)
    entries = {prepared.chunk_key(i): CachedEmbedding(remote(f"cached-{i}", 48), (2, 8, 12), 1.0, i, 3, 4 * i, 4)
               for i in cached}
    for entry in entries.values():  # what the cache holds: the bytes inline
        entry.embeddings.ClearField("remote")
        entry.embeddings.inline_data = b"\0" * 48 * 64 * 4
    stage = MediaStage(decoders=pool("decoder", decoder, DecodeCost(CostSeeds())),
                       encoders=pool("encoder", encoder, TokenCost(1.0, 1.0), 2), cache=Cache(entries),
                       model_id="model", encoder_dtype="float32", family=FAMILY,
                       fetch_policy=FetchPolicy(), chunk_frames=4)
    return ChunkFeed(stage, "req", [prepared], deadline=1e12, latest_start=1e12, attempts=3,
                     max_in_flight=max_in_flight, **kwargs)


async def run(feed: ChunkFeed, llm: Llm) -> list:
    request = llm_pb2.LlmRequest(request_id="req")
    return [reply async for reply in feed.replies(Replica("llm", None, llm, None), request)]


@pytest.fixture
def released(monkeypatch):
    refs: list[tensor_pb2.TensorRef] = []

    async def release(batch):
        refs.extend(batch)

    monkeypatch.setattr(streamed.transport, "release", release)
    return refs


async def test_the_llm_gets_the_plan_first_then_every_chunk_once_in_any_order(released):
    decoder, encoder, llm = Decoder(), Encoder(), Llm()
    replies = await run(make_feed(decoder, encoder), llm)
    assert [r.WhichOneof("event") for r in replies] == ["final"]
    assert llm.inputs[0].WhichOneof("input") == "request"
    sent = [m.chunk for m in llm.inputs[1:]]
    assert sorted(c.chunk_index for c in sent) == [0, 1, 2] and {c.media_index for c in sent} == {0}
    assert [c.chunk_index for c in sent] != [0, 1, 2]  # later chunks encoded faster: sent as they finished
    (request,) = decoder.requests
    assert request.chunk_frames == 4 and list(request.chunk_indices) == [] and request.max_chunks_ahead == 2
    assert released == [] and not llm.is_cancelled


async def test_the_media_are_reported_done_once_every_chunk_is_sent_before_the_llm_answers(released):
    decoder, encoder, llm = Decoder(), Encoder(), Llm()
    done = []  # what the llm had been sent, and whether it had answered, when the feed said so
    feed = make_feed(decoder, encoder, on_media_done=lambda: done.append((len(llm.inputs), llm.closed.is_set())))
    await run(feed, llm)
    assert done == [(4, False)], "once, after the plan and the three chunks, before the llm's first reply"


async def test_a_partly_cached_video_decodes_only_the_missing_chunks_and_sends_the_cached_ones(released):
    decoder, encoder, llm = Decoder(), Encoder(), Llm()
    await run(make_feed(decoder, encoder, cached=(0, 2)), llm)
    assert [list(r.chunk_indices) for r in decoder.requests] == [[1]]
    assert encoder.num_calls == 1
    sent = {m.chunk.chunk_index: m.chunk.embeddings for m in llm.inputs[1:]}
    assert sorted(sent) == [0, 1, 2]
    assert sent[0].WhichOneof("location") == "inline_data" and sent[1].remote.handle_id == "emb-1"


async def test_a_cached_chunk_evicted_since_the_lookup_is_decoded_and_encoded(released):
    decoder, encoder, llm = Decoder(), Encoder(), Llm()
    feed = make_feed(decoder, encoder, cached=(0, 1, 2))
    feed.prepared[0] = dataclasses.replace(feed.prepared[0], shape=None)  # all cached: nothing was to decode
    feed.media.cache.entries.pop(feed.prepared[0].chunk_key(1))
    await run(feed, llm)
    assert [list(r.chunk_indices) for r in decoder.requests] == [[1]] and encoder.num_calls == 1
    assert sorted(m.chunk.chunk_index for m in llm.inputs[1:]) == [0, 1, 2]


async def test_chunks_in_flight_never_exceed_the_cap(released, monkeypatch):
    decoder, encoder, llm = Decoder(), Encoder(), Llm()
    feed = make_feed(decoder, encoder, max_in_flight=1)
    peak = 0
    acquire = feed.gate.acquire

    async def counted():
        nonlocal peak
        await acquire()
        peak = max(peak, 1 - feed.gate._value)

    monkeypatch.setattr(feed.gate, "acquire", counted)
    await run(feed, llm)
    assert peak == 1 and len(llm.inputs) == 4
    assert [m.chunk.chunk_index for m in llm.inputs[1:]] == [0, 1, 2]  # one at a time: in order


async def test_a_chunk_whose_encoder_went_away_is_decoded_again_alone(released, monkeypatch):
    monkeypatch.setattr(ReplicaPool, "mark_failed", lambda pool, replica: setattr(replica, "healthy", False))
    decoder, encoder, llm = Decoder(), Encoder(fail={1}), Llm()
    await run(make_feed(decoder, encoder), llm)
    assert [list(r.chunk_indices) for r in decoder.requests] == [[], [1]]
    assert sorted(m.chunk.chunk_index for m in llm.inputs[1:]) == [0, 1, 2]


async def test_a_failed_decode_cancels_the_llm_and_the_decoder_and_releases_what_was_not_sent(released):
    decoder, encoder, llm = Decoder(fail_after=2), Encoder(block={1}), Llm()
    with pytest.raises(FeedFailed) as failed:
        await run(make_feed(decoder, encoder), llm)
    assert failed.value.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert llm.is_cancelled and all(s.is_cancelled for s in decoder.streams)
    assert [m.chunk.chunk_index for m in llm.inputs[1:]] == [0]  # the llm's now: it releases chunk 0
    assert [r.remote.handle_id for r in released] == ["frames-1-1"]  # decoded, its encode cancelled


async def test_a_cancelled_request_cancels_the_llm_call_and_the_decoder_stream(released):
    decoder, encoder, llm = Decoder(), Encoder(), Llm()
    task = asyncio.ensure_future(run(make_feed(decoder, encoder), llm))
    while not decoder.streams:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert llm.is_cancelled and all(s.is_cancelled for s in decoder.streams)


class RefusingLlm(Llm):
    """Refuses the request as it arrives (its queue is full). Its status reaches the reader only once the feed
    first tries to send a chunk: a write that races the refusal fails in gRPC's core, whose INTERNAL then
    replaces the llm's RESOURCE_EXHAUSTED as the call's status."""

    def __init__(self):
        super().__init__()
        self.refused, self.settled, self.raced = asyncio.Event(), asyncio.Event(), False

    async def write(self, message):
        if self.refused.is_set():
            self.raced = True
            self.settled.set()
            raise rpc_error(grpc.StatusCode.INTERNAL)
        await super().write(message)
        self.refused.set()

    async def initial_metadata(self):
        self.settled.set()
        await self.refused.wait()  # none sent: the status ends the call
        return ()

    def done(self):
        return self.refused.is_set()

    async def _replies(self):
        await self.settled.wait()
        raise rpc_error(grpc.StatusCode.INTERNAL if self.raced else grpc.StatusCode.RESOURCE_EXHAUSTED)
        yield


async def test_no_chunk_is_written_to_a_call_the_llm_refused_so_its_status_is_the_request_s(released):
    decoder, encoder, llm = Decoder(), Encoder(), RefusingLlm()
    feed = make_feed(decoder, encoder)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await run(feed, llm)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and feed.error is None
    assert [m.WhichOneof("input") for m in llm.inputs] == ["request"] and not llm.raced


class DroppingLlm(Llm):
    """Ends the call at once (at its concurrency limit: ends_after "") or after taking the request and one chunk
    (its KV cache full, it drops the prompt: "chunk"): the next write races that end and fails in gRPC's core,
    which puts INTERNAL in place of the llm's status."""

    def __init__(self, ends_after: str):
        super().__init__()
        self.dropped = asyncio.Event()
        self.ends_after = ends_after
        if not ends_after:
            self.dropped.set()

    async def write(self, message):
        if self.dropped.is_set():
            raise rpc_error(grpc.StatusCode.INTERNAL)
        await super().write(message)
        if message.WhichOneof("input") == self.ends_after:
            self.dropped.set()

    def done(self):
        return False  # the call's end is not seen before the write

    async def _replies(self):
        await self.dropped.wait()
        await asyncio.sleep(0.01)  # the racing write goes first
        raise rpc_error(grpc.StatusCode.INTERNAL)
        yield


@pytest.mark.parametrize("ends_after, written", [("", []), ("chunk", ["request", "chunk"])])
async def test_a_write_that_races_the_llm_ending_the_call_is_a_lost_call_not_a_media_error(released, ends_after,
                                                                                          written):
    decoder, encoder, llm = Decoder(), Encoder(), DroppingLlm(ends_after)
    feed = make_feed(decoder, encoder)
    with pytest.raises(StreamLost):
        await run(feed, llm)
    assert feed.error is None and llm.is_cancelled
    assert [m.WhichOneof("input") for m in llm.inputs] == written
