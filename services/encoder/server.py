"""The Encoder gRPC servicer: frames in, vision embeddings out (and into the embedding cache when asked)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc

from mmserve import transport
from mmserve.cache import CachedEmbedding, EmbeddingCache
from mmserve.models.family import Family, MediaItem, pack
from mmserve.v1 import decoder_pb2, encoder_pb2, encoder_pb2_grpc
from services.encoder.batcher import Batcher, EncoderOverloaded
from services.unified.deadlines import due_from


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    def __init__(self, batcher: Batcher, family: Family, cache: EmbeddingCache | None = None):
        self.batcher = batcher
        self.family = family
        self.cache = cache

    def _pixel_values(self, kind: str, frames):
        # Normalise and patchify where the tower runs (on a GPU the frames go up once, as uint8).
        return self.family.preprocess_frames(kind, frames.to(self.batcher.device))

    async def Encode(self, request: encoder_pb2.EncodeRequest, context: grpc.aio.ServicerContext):
        try:
            # Shared memory is mapped, not copied; a remote ref is pulled from the decoder that made it.
            frames = await transport.resolve(request.frames, context.time_remaining())
            # encode_ms prices this replica's work for the router: a pull from a slow producer is not part of it.
            start = time.perf_counter()
            pixel_values, item = await asyncio.to_thread(self._pixel_values, _kind(request), frames)
            preprocess_ms = (time.perf_counter() - start) * 1e3
            grid = self._grid(request, item)
            # The queue and a unified replica's slices are ordered by it; a batch may not overrun it.
            encoded = await self.batcher.encode(pixel_values, item, due_from(context.invocation_metadata()))
            packed = time.perf_counter()
            embeddings = pack(encoded.item)
        except transport.TensorUnavailable as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"frames: {err}")
        except ValueError as err:  # includes TensorRefError and bad frame shapes
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"frames: {err}")
        except EncoderOverloaded as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        ref = await asyncio.to_thread(transport.to_ref, embeddings)  # copies into shared memory or bytes
        work_ms = preprocess_ms + encoded.tower_ms + (time.perf_counter() - packed) * 1e3
        if self.cache is not None and request.HasField("cache"):
            await self._write_cache(request.cache, embeddings, ref, tuple(grid))
        return encoder_pb2.EncodeResponse(embeddings=ref, grid_thw=list(grid),
                                          encode_ms=(time.perf_counter() - start) * 1e3, work_ms=work_ms)

    def _grid(self, request: encoder_pb2.EncodeRequest, item: MediaItem) -> tuple[int, ...]:
        """The decoder's planned grid where it sent one (InternVL's tile layout), else the frames' own."""
        if not request.grid:
            return item.grid
        planned = dataclasses.replace(item, grid=tuple(request.grid))
        if self.family.num_tokens(planned) != self.family.num_tokens(item):
            raise ValueError(f"grid {list(request.grid)} does not match the frames' {list(item.grid)}")
        return planned.grid

    async def _write_cache(self, slot: encoder_pb2.CacheSlot, embeddings, ref,
                           grid: tuple[int, int, int]) -> None:
        """Best effort: a slow or absent Redis costs at most its short timeout and never fails the request."""
        # The response's bytes serve when it travels inline; a shared-memory or remote ref needs a second copy.
        inline = (ref if ref.WhichOneof("location") == "inline_data"
                  else await asyncio.to_thread(transport.to_inline, embeddings))
        await self.cache.put(slot.key, CachedEmbedding(inline, grid, slot.second_per_grid_t, slot.chunk_index,
                                                       max(slot.num_chunks, 1), slot.first_frame, slot.num_frames,
                                                       tuple(slot.timestamps)))


def _kind(request: encoder_pb2.EncodeRequest) -> str:
    # An unspecified kind (older callers, warm-up) is an image: one or more frames encoded as they come.
    return "video" if request.kind == decoder_pb2.MEDIA_KIND_VIDEO else "image"
