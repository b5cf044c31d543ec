"""Streamed prefill: the llm gets the planned request at once, then each chunk's embeddings as they are ready.

Cached windows are read from the cache and sent inline; the missing ones are decoded (only those: chunk_indices)
and encoded on any encoder, each sent as its encoder finishes (the llm orders them). At most max_in_flight chunks
of a request are held between the decoder and the llm; on any failure or cancellation the llm call and the
decoder stream are cancelled and every lease not handed to the llm is released.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable

import grpc

from mmserve import transport
from mmserve.cache import fits_window
from mmserve.v1 import decoder_pb2, encoder_pb2, llm_pb2, tensor_pb2
from services.router.failover import Failover, ReplicaDown, stream_from
from services.router.planning import missing_shape
from services.router.media import KINDS, Embedded, MediaStage, Prepared, all_or_nothing, time_left
from services.router.replicas import Replica


class StreamingUnsupported(Exception):
    """The llm replica has no GenerateStreamed (an older version): the request goes store-and-forward."""


class StreamedLlmDown(Exception):
    """The llm replica went down (or stalled) before its first reply: nothing reached the client, but the chunks
    sent to it are gone with it, so the request runs again store-and-forward, on another replica."""


class StreamLost(StreamedLlmDown):
    """The llm ended the call (refused it at its concurrency limit, or dropped the prompt when its KV cache was
    full) while the request or a chunk was being written: gRPC's core failed the write and put INTERNAL in place of
    the llm's status, which is lost. Nothing reached the client, so the request runs again store-and-forward (where
    a refusal keeps its status); the replica is not down."""


class FeedFailed(Exception):
    """Feeding the chunks failed (a decoder, an encoder, the cache): error says why; the llm call was cancelled."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class ChunkMismatch(Exception):
    """The decoder's chunks differ from the plan the llm was sent (a decoder without fixed windows)."""


def planned_embedding(prepared: Prepared) -> llm_pb2.MediaEmbedding:
    """The item as the llm's first message describes it: grid, timing, each chunk's rows, identity; no tensors."""
    item = prepared.planned_item
    return llm_pb2.MediaEmbedding(kind=KINDS[item.kind], grid_thw=list(item.grid),
                                  second_per_grid_t=item.second_per_grid_t, timestamps=list(item.timestamps),
                                  chunk_rows=list(prepared.chunks.rows), digest=prepared.key(0))


class ChunkFeed:
    """One request's chunks, fed to one GenerateStreamed call; embedded holds each item's timings when done."""

    def __init__(self, media: MediaStage, request_id: str, prepared: list[Prepared], *, deadline: float,
                 latest_start: float, attempts: int, max_in_flight: int,
                 on_media_done: Callable[[], None] = lambda: None):
        self.media, self.request_id, self.prepared = media, request_id, prepared
        # Called once every chunk is decoded, encoded and sent, before the llm's prefill of the last one: the
        # router's backlogs stop counting work that is done.
        self.on_media_done = on_media_done
        self.deadline, self.latest_start, self.attempts = deadline, latest_start, attempts
        self.max_in_flight = max_in_flight
        self.gate = asyncio.Semaphore(max_in_flight)  # chunks held between decoder and llm
        self.embedded = [Embedded(planned_embedding(p), cached=p.is_cached) for p in prepared]
        self.timings = [_Timings() for _ in prepared]  # each item's, as far as its feed has got
        # Leased refs not yet handed on, by (media index, chunk index, "frames" or "embeddings").
        self.held: dict[tuple[int, int, str], tensor_pb2.TensorRef] = {}
        self.error: BaseException | None = None  # what ended the feed early
        self._write_lock = asyncio.Lock()
        self._is_queued = False  # the llm queued the request (its initial metadata came): chunks may go
        self._write_lost = False  # a write (the request's or a chunk's) raced the call's end (StreamLost)
        self._tasks: list[asyncio.Task] = []

    async def replies(self, llm: Replica, llm_request: llm_pb2.LlmRequest):
        """The llm's replies while the chunks are fed; a failed feed is raised in place of the cancelled call."""
        call = llm.stub.GenerateStreamed(timeout=time_left(self.deadline))
        feeding = asyncio.ensure_future(self._feed(call, llm_request))
        is_finished = False
        try:
            async for reply in call:
                if reply.WhichOneof("event") == "final":  # the feed may still be closing its streams, or (a prefix
                    self._settle()  # the llm had cached) still decoding: the final tells what was done
                yield reply
            is_finished = True
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as err:
            for error in (err, self.error):  # a write to the refused call fails the feed with the same status
                if isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    raise StreamingUnsupported(error.details()) from None
            if self._write_lost and isinstance(err, grpc.aio.AioRpcError) and err.code() == grpc.StatusCode.INTERNAL:
                raise StreamLost(f"the llm ended the call during a write ({err.details()})") from None
            if self.error is not None:  # the feed failed and cancelled the call: its error is the request's
                raise FeedFailed(self.error) from None
            raise
        finally:
            if not is_finished:
                call.cancel()  # the llm frees what the request holds
            if self.error is None:  # a failed feed is cleaning up already: let it finish
                feeding.cancel()
            await asyncio.gather(feeding, return_exceptions=True)  # its leases released before we return

    async def _feed(self, call, llm_request: llm_pb2.LlmRequest) -> None:
        try:
            await self._send(call, llm_pb2.LlmInput(request=llm_request))
            await all_or_nothing(self._feed_item(call, i, p) for i, p in enumerate(self.prepared))
            self.on_media_done()
            await call.done_writing()
        except BaseException as err:
            # InvalidStateError: the llm call ended first (refused, failed): its own status, read by replies(), is
            # the request's, not this write's.
            if not isinstance(err, (asyncio.CancelledError, asyncio.InvalidStateError)):
                self.error = err
            call.cancel()  # the llm frees the request's KV blocks and the chunks it holds
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await transport.release(list(self.held.values()))
            self.held.clear()
            raise

    async def _feed_item(self, call, media_index: int, prepared: Prepared) -> None:
        """Cached windows from the cache, the rest decoded and encoded; one evicted meanwhile, or whose encoder
        went away, is decoded again on its own."""
        redo: list[int] = []
        encoder_tries = Failover(self.media.encoders, self.attempts, self.request_id)
        timings = self.timings[media_index]
        work = [self._decode(call, media_index, prepared, list(prepared.missing_chunks), redo, encoder_tries,
                             timings)] if prepared.missing_chunks else []
        await all_or_nothing([self._send_cached(call, media_index, prepared, redo), *work])
        while redo:
            indices = sorted(redo)
            redo.clear()
            await self._decode(call, media_index, prepared, indices, redo, encoder_tries, timings)
        self._settle()

    def _settle(self) -> None:
        """Each item's timings so far into embedded, which the final reads."""
        for i, t in enumerate(self.timings):
            self.embedded[i] = dataclasses.replace(self.embedded[i], decode_ms=t.decode_ms, encode_ms=t.encode_ms,
                                                   wait_ms=t.wait_ms)

    async def _send_cached(self, call, media_index: int, prepared: Prepared, redo: list[int]) -> None:
        chunks = prepared.chunks
        for i in prepared.cached_chunks:
            async with self.gate:
                (entry,) = await self.media.cache.get_many([prepared.chunk_key(i)])
                if not fits_window(entry, i, chunks.num_chunks, chunks.frames_of(i)[0], chunks.rows[i],
                                   self.media.encoder_dtype):
                    redo.append(i)  # evicted since the lookup
                    continue
                await self._write(call, media_index, i, entry.embeddings)

    async def _decode(self, call, media_index: int, prepared: Prepared, indices: list[int], redo: list[int],
                      encoder_tries: Failover, timings: _Timings) -> None:
        """Decodes the windows in indices (on another decoder if one goes away) and waits for their encodes."""
        tries = Failover(self.media.decoders, self.attempts, self.request_id)
        left = list(indices)
        encodes: list[asyncio.Task] = []
        while left:
            try:
                await self._decode_once(call, media_index, prepared, left, redo, encoder_tries, timings, tries,
                                        encodes)
            except ReplicaDown as down:
                if down.stage != "decoder" or not tries.retry(down.replica):
                    raise
        await asyncio.gather(*encodes)

    async def _decode_once(self, call, media_index, prepared, left, redo, encoder_tries, timings, tries,
                           encodes) -> None:
        chunks = prepared.chunks
        shape = missing_shape(prepared.planned, chunks, tuple(left))  # these windows' share of the decode
        request = prepared.decode_request(
            self.request_id, chunk_frames=chunks.chunk_frames,
            chunk_indices=left if len(left) < chunks.num_chunks else [], max_chunks_ahead=self.max_in_flight)
        queued = time.perf_counter()
        async with self.media.decoders.slot(latest_start=self.latest_start, exclude=tries.exclude,
                                            work_ms=lambda r: r.costs.predict(shape.num_frames, shape.num_pixels)
                                            ) as decoder:
            start = time.perf_counter()
            timings.wait_ms = max(timings.wait_ms, (start - queued) * 1e3)
            stream = decoder.stub.Decode(request, timeout=time_left(self.deadline), metadata=transport.caller_metadata())
            messages = stream_from("decoder", decoder, stream).__aiter__()
            num_frames = num_pixels = 0
            last = start
            try:
                while True:
                    await self.gate.acquire()  # backpressure: the next chunk only when one has left
                    try:
                        c = await messages.__anext__()
                    except BaseException:
                        self.gate.release()
                        raise
                    self.held[media_index, c.chunk_index, "frames"] = c.frames
                    now = time.perf_counter()
                    timings.decode_ms += (now - last) * 1e3  # up to its last chunk's arrival
                    last = now
                    _check(c, chunks, left)
                    left.remove(c.chunk_index)
                    num_frames += len(c.frame_indices)
                    num_pixels += math.prod(c.frames.shape[:3])
                    task = asyncio.ensure_future(self._encode_and_send(call, media_index, prepared, c, redo,
                                                                       encoder_tries, timings))
                    encodes.append(task)
                    self._tasks.append(task)
            except StopAsyncIteration:
                pass
            finally:
                stream.cancel()  # a failure or cancellation ends the decoder's stream at once
            decoder.costs.observe(num_frames, num_pixels, (time.perf_counter() - start) * 1e3)

    async def _encode_and_send(self, call, media_index: int, prepared: Prepared, c: decoder_pb2.DecodeChunk,
                               redo: list[int], tries: Failover, timings: _Timings) -> None:
        """One chunk encoded (the encoder writes its cache entry) and sent; its gate slot given back after."""
        try:
            first_frame, num_frames = prepared.chunks.frames_of(c.chunk_index)
            item = prepared.planned_item
            stamps = (self.media.family.timestamps(list(c.frame_indices), c.video_fps)
                      if item.kind == "video" else ())
            slot = encoder_pb2.CacheSlot(
                key=prepared.chunk_key(c.chunk_index), chunk_index=c.chunk_index,
                num_chunks=prepared.chunks.num_chunks, second_per_grid_t=item.second_per_grid_t,
                first_frame=first_frame, num_frames=num_frames, timestamps=stamps)
            request = encoder_pb2.EncodeRequest(request_id=self.request_id, kind=KINDS[item.kind], frames=c.frames,
                                                grid=c.grid, cache=slot if self.media.cache is not None else None)
            timings.encode_started(time.perf_counter())
            frames_key = (media_index, c.chunk_index, "frames")
            try:
                reply = await self.media.encode_chunk(request, prepared, self.deadline, self.latest_start, tries.exclude)
            except ReplicaDown as down:
                if not tries.retry(down.replica):
                    raise
                await transport.release([self.held.pop(frames_key)])
                redo.append(c.chunk_index)  # its frames may be gone with the encoder: decoded again
                return
            self.held.pop(frames_key)  # the encoder took them (cancelled before it answered: released by _feed)
            timings.encode_ended(time.perf_counter())
            self.held[media_index, c.chunk_index, "embeddings"] = reply.embeddings
            await self._write(call, media_index, c.chunk_index, reply.embeddings)
        finally:
            self.gate.release()

    async def _write(self, call, media_index: int, chunk_index: int, embeddings: tensor_pb2.TensorRef) -> None:
        async with self._write_lock:  # one message at a time on the call
            if not self._is_queued:
                # A chunk written while the llm refuses the request can fail in gRPC's core, which then reports
                # INTERNAL in place of the llm's RESOURCE_EXHAUSTED: wait until it has queued the request.
                await call.initial_metadata()
                self._is_queued = True
            if call.done():
                raise asyncio.InvalidStateError("the llm call has ended")  # its own status is the request's
            await self._send(call, llm_pb2.LlmInput(chunk=llm_pb2.MediaChunk(
                media_index=media_index, chunk_index=chunk_index, embeddings=embeddings)))
        self.held.pop((media_index, chunk_index, "embeddings"), None)  # the llm's now

    async def _send(self, call, message: llm_pb2.LlmInput) -> None:
        """Writes message; one that races the call's end (the llm refused or dropped the request meanwhile) fails
        in gRPC's core, which makes the call's status INTERNAL: not the feed's error (StreamLost)."""
        try:
            await call.write(message)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.INTERNAL:
                raise
            self._write_lost = True
            raise asyncio.InvalidStateError("the llm call ended during a write") from None


class _Timings:
    """One item's decode time (summed over its decodes, each to its last chunk), encode time (first encode's start to the last's end)
    and its wait for a decoder."""

    def __init__(self) -> None:
        self.decode_ms = self.wait_ms = 0.0
        self._first_encode = self._last_encode = 0.0

    def encode_started(self, now: float) -> None:
        self._first_encode = self._first_encode or now

    def encode_ended(self, now: float) -> None:
        self._last_encode = now

    @property
    def encode_ms(self) -> float:
        return max(0.0, self._last_encode - self._first_encode) * 1e3


def _check(c: decoder_pb2.DecodeChunk, chunks, left: list[int]) -> None:
    """The decoder's chunk is a window the plan asked for, of the planned size."""
    is_window = not chunks.chunk_frames or (c.chunk_index < chunks.num_chunks
                                            and len(c.frame_indices) == chunks.frames_of(c.chunk_index)[1])
    if c.chunk_index not in left or c.num_chunks != chunks.num_chunks or not is_window:
        raise ChunkMismatch(f"decoder: chunk {c.chunk_index} of {c.num_chunks} with {len(c.frame_indices)} frames "
                            f"is not a window of the plan ({chunks.num_chunks} chunks of {chunks.chunk_frames} "
                            "frames)")
