"""The media half of a request: cache lookup per chunk, else decode → encode (the encoder writes the cache).

A hit is passed on as cache keys (the llm reads the embeddings from the cache itself): the router moves
handles, never tensor bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import pathlib
import time
from typing import Callable


from mmserve import transport
from mmserve.cache import CachedEmbedding, EmbeddingCache, join_chunks
from mmserve.cache_keys import MediaParams, media_key, window_key
from mmserve.media.errors import MediaError
from mmserve.media.fetch import FetchPolicy, MediaFile, fetch_uri, hash_file_uri, uri_scheme
from mmserve.models.family import Family
from mmserve.models.family import MediaItem as FamilyItem
from mmserve.v1 import api_pb2, decoder_pb2, encoder_pb2, llm_pb2
from services.router import metrics
from services.router.costs import MediaShape, ShapeEstimator, encode_work_ms
from services.router.failover import Failover, ReplicaDown, answer_from, stream_from
from services.router.planning import (Chunks, cached_chunks, decode_plan, missing_shape, num_patches, patch_side,
                                     plan_chunks, shape_of)
from services.router.policy import degraded_frames
from services.router.replicas import ReplicaPool
from services.unified.deadlines import due_metadata

KINDS = {"image": decoder_pb2.MEDIA_KIND_IMAGE, "video": decoder_pb2.MEDIA_KIND_VIDEO}


@dataclasses.dataclass(frozen=True)
class MediaItem:
    kind: str  # "image" or "video"
    media: api_pb2.Media
    where: str  # e.g. "messages[0].parts[1].video", for error messages


@dataclasses.dataclass(frozen=True)
class Embedded:
    embedding: llm_pb2.MediaEmbedding
    cached: bool
    decode_ms: float = 0.0
    encode_ms: float = 0.0
    wait_ms: float = 0.0  # waiting for a decoder slot


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A media item read and looked up: the cache hit, or the shape predicted for decode and encode."""

    item: MediaItem
    data: bytes | MediaFile  # a file:// item the decoders read in place: the file, never its bytes
    digest: str  # sha256 of the bytes
    model_id: str
    params: MediaParams
    hit: CachedEmbedding | None = None  # the joined chunk entries' headers (no tensor bytes)
    num_hit_chunks: int = 0
    shape: MediaShape | None = None  # predicted decode and encode work (None on a hit)
    planned: MediaShape | None = None  # the exact shape from the header (None: unreadable, the decoder will say)
    planned_item: FamilyItem | None = None  # the family's item from the header (grid, Qwen3-VL's timestamps)
    degraded: bool = False
    chunks: Chunks | None = None  # streamed prefill: the item's fixed windows (None: store-and-forward)
    cached_chunks: tuple[int, ...] = ()  # of those, the ones found in the cache

    @property
    def num_bytes(self) -> int:
        return self.data.size if isinstance(self.data, MediaFile) else len(self.data)

    @property
    def contents(self) -> bytes | pathlib.Path:
        """What a header can be read from here: the bytes or the file."""
        return self.data.path if isinstance(self.data, MediaFile) else self.data

    def decode_request(self, request_id: str, **fields) -> decoder_pb2.DecodeRequest:
        """The decoder's request for the item: its bytes, or the file with the size and age it was hashed at."""
        source = (dict(uri=self.data.uri, file_size=self.data.size, file_mtime_ns=self.data.mtime_ns)
                  if isinstance(self.data, MediaFile) else dict(data=self.data))
        params = self.params
        return decoder_pb2.DecodeRequest(
            request_id=request_id, kind=KINDS[self.item.kind], fps=params.fps, min_frames=params.min_frames,
            max_frames=params.max_frames, min_pixels=params.min_pixels, max_pixels=params.max_pixels,
            total_pixels=params.total_pixels, **source, **fields)

    @property
    def missing_chunks(self) -> tuple[int, ...]:
        """The windows to decode and encode (streamed prefill)."""
        cached = set(self.cached_chunks)
        return tuple(i for i in range(self.chunks.num_chunks) if i not in cached) if self.chunks else ()

    @property
    def is_cached(self) -> bool:
        """Whether nothing of the item is left to decode."""
        return self.hit is not None or (self.chunks is not None and not self.missing_chunks)

    @property
    def family_item(self) -> FamilyItem:
        """The family's item the prompt will hold, hit or not (an empty grid when the header is unreadable: the
        decoder names the problem later)."""
        if self.hit is not None:
            return FamilyItem(self.item.kind, tuple(self.hit.grid_thw), self.hit.timestamps,
                              self.hit.second_per_grid_t)
        return self.planned_item or FamilyItem(self.item.kind, (0, 0, 0))

    def key(self, chunk_index: int) -> str:
        return media_key(self.digest, self.model_id, self.params, chunk_index)

    def chunk_key(self, chunk_index: int) -> str:
        """A streamed chunk's key: a video's fixed window, or the whole of an image (as store-and-forward keys it)."""
        if self.chunks is None or not self.chunks.chunk_frames or self.item.kind != "video":
            return self.key(chunk_index)
        return window_key(self.key(0), self.chunks.chunk_frames, chunk_index)


class MediaStage:
    """Turns one media item into embeddings the LLM can splice in."""

    def __init__(self, *, decoders: ReplicaPool, encoders: ReplicaPool, cache: EmbeddingCache | None,
                 model_id: str, encoder_dtype: str, family: Family, fetch_policy: FetchPolicy, max_frames: int = 0,
                 max_pixels: int = 0, chunk_frames: int = 0, files_in_place: bool = False):
        self.decoders = decoders
        self.encoders = encoders
        self.cache = cache
        self.model_id = model_id
        self.encoder_dtype = encoder_dtype
        self.family = family
        self.fetch_policy = fetch_policy
        self.files_in_place = files_in_place  # file:// media: hashed here, read by the decoders
        self.patch_side = patch_side(family)  # encode costs count patches; the frames' pixels tell them
        self.shapes = ShapeEstimator(self.patch_side)
        # The server's caps also bound what a request gets when it asks for nothing; max_pixels bounds one image or
        # one video frame for every family (a family's budget over all frames is its total_pixels).
        self.max_frames = max_frames or family.default_params("video").max_frames
        self.max_pixels = max_pixels or family.default_params("image").max_pixels
        self.chunk_frames = chunk_frames  # streamed prefill's video windows (0: store-and-forward)

    def params(self, item: MediaItem) -> MediaParams:
        """The effective preprocessing parameters: request overrides, else the family's defaults within the
        server's caps."""
        m, default = item.media, self.family.default_params(item.kind)
        if item.kind == "image":
            return dataclasses.replace(
                default,
                min_pixels=m.min_pixels if m.HasField("min_pixels") else default.min_pixels,
                max_pixels=m.max_pixels if m.HasField("max_pixels") else min(default.max_pixels, self.max_pixels))
        return dataclasses.replace(
            default,
            fps=m.fps if m.HasField("fps") else default.fps,
            max_frames=m.max_frames if m.HasField("max_frames") else min(default.max_frames, self.max_frames),
            min_pixels=m.min_pixels if m.HasField("min_pixels") else min(default.min_pixels, self.max_pixels),
            max_pixels=m.max_pixels if m.HasField("max_pixels") else min(default.max_pixels, self.max_pixels))

    async def _read(self, item: MediaItem) -> tuple[bytes | MediaFile, str]:
        """The item's bytes (or its file, read in place) and their sha256."""
        if item.media.WhichOneof("source") == "data":
            data = item.media.data
        else:
            uri, policy = item.media.uri, self.fetch_policy
            try:
                if self.files_in_place and uri_scheme(uri) == "file":
                    file = await asyncio.to_thread(hash_file_uri, uri, media_root=policy.media_root,
                                                   max_bytes=policy.max_bytes)
                    return file, file.sha256
                data = await fetch_uri(uri, policy=policy)
            except MediaError as err:
                raise MediaError(f"{item.where}.{err}") from None
        return data, await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())

    async def prepare(self, item: MediaItem, stream: bool = True) -> Prepared:
        """Reads the item, looks every chunk up in the cache and, on a miss, predicts what it will cost; stream:
        by the fixed windows of streamed prefill (when the router streams at all)."""
        data, digest = await self._read(item)
        return await self._lookup_item(Prepared(item, data, digest, self.model_id, self.params(item)), stream)

    async def degrade(self, prepared: Prepared, frame_scale: float) -> Prepared:
        """The same video with fewer frames (its own cache entries); images are left as they are."""
        if prepared.item.kind != "video" or prepared.is_cached:
            return prepared
        params = dataclasses.replace(prepared.params, max_frames=degraded_frames(prepared.params.max_frames,
                                                                                 frame_scale))
        return await self._lookup_item(dataclasses.replace(prepared, params=params, degraded=True, chunks=None,
                                                           cached_chunks=()), stream=prepared.chunks is not None)

    async def store_and_forward(self, prepared: Prepared) -> Prepared:
        """The item looked up again for the store-and-forward path (an llm that cannot take a stream)."""
        return await self._lookup_item(dataclasses.replace(prepared, chunks=None, cached_chunks=()), stream=False)

    async def _lookup_item(self, prepared: Prepared, stream: bool = True) -> Prepared:
        if stream and self.chunk_frames:
            plan = await asyncio.to_thread(decode_plan, prepared.item.kind, prepared.contents, prepared.params,
                                           self.family)
            if plan is not None:  # streamed: the plan says the windows, a hit's as well
                return await self._lookup_windows(prepared, plan)
        hit, num_chunks = await self._lookup(prepared.key) if self.cache is not None else (None, 0)
        if hit is None:  # a hit's grid is in its entry; only a miss needs its header read
            plan = await asyncio.to_thread(decode_plan, prepared.item.kind, prepared.contents, prepared.params,
                                           self.family)
            prepared = dataclasses.replace(prepared, planned=shape_of(plan, self.family) if plan else None,
                                           planned_item=plan.item if plan else None)
        return self._with_hit(prepared, hit, num_chunks)

    async def _lookup_windows(self, prepared: Prepared, plan) -> Prepared:
        """Each fixed window looked up (headers only): the cached ones stream from the cache, the rest are decoded."""
        chunks = plan_chunks(plan, self.family, self.chunk_frames)
        planned = shape_of(plan, self.family)
        prepared = dataclasses.replace(prepared, planned=planned, planned_item=plan.item, chunks=chunks)
        cached: tuple[int, ...] = ()
        if self.cache is not None:
            entries = await self.cache.get_many([prepared.chunk_key(i) for i in range(chunks.num_chunks)],
                                                header_only=True)
            cached = cached_chunks(entries, chunks, self.encoder_dtype)
        prepared = dataclasses.replace(prepared, cached_chunks=cached)
        return dataclasses.replace(prepared, shape=missing_shape(planned, chunks, prepared.missing_chunks))

    def without_hit(self, prepared: Prepared) -> Prepared:
        """The item to compute again (its cache entries went away after the lookup)."""
        return self._with_hit(prepared, None, 0)

    def _with_hit(self, prepared: Prepared, hit: CachedEmbedding | None, num_chunks: int) -> Prepared:
        shape = None
        if hit is None:
            shape = prepared.planned or self.shapes.estimate(prepared.item.kind, prepared.digest, prepared.num_bytes,
                                                  max_frames=prepared.params.max_frames or 1,
                                                  max_pixels=prepared.params.max_pixels)
        return dataclasses.replace(prepared, hit=hit, num_hit_chunks=num_chunks, shape=shape)

    async def embed(self, request_id: str, prepared: Prepared, *, deadline: float, latest_start: float,
                    attempts: int) -> Embedded:
        """Embeddings of a prepared item: the cache hit, else decoded and encoded (the encoder writes the cache).

        A replica found down is withdrawn and the item is redone on others, up to attempts tries (ReplicaDown
        after the last).
        """
        if prepared.hit is not None:
            embedding = self._embedding(prepared.item.kind, prepared.hit)
            embedding.ClearField("embeddings")  # the llm reads them from the cache
            embedding.cache_keys.extend(prepared.key(i) for i in range(prepared.num_hit_chunks))
            return Embedded(embedding, cached=True)
        tries = {"decoder": Failover(self.decoders, attempts, request_id),
                 "encoder": Failover(self.encoders, attempts, request_id)}
        while True:
            try:
                return await self._decode_and_encode(request_id, prepared, deadline, latest_start, tries)
            except ReplicaDown as down:
                if not tries[down.stage].retry(down.replica):
                    raise  # the caller names the stage

    async def _decode_and_encode(self, request_id: str, prepared: Prepared, deadline: float, latest_start: float,
                                 tries: dict[str, Failover]) -> Embedded:
        item, shape = prepared.item, prepared.shape
        request = prepared.decode_request(request_id)
        encodes: list[asyncio.Future] = []
        timestamps: list[float] = []
        first_chunk = second_per_grid_t = 0.0
        num_frames = num_pixels = 0
        queued = time.perf_counter()
        try:
            async with self.decoders.slot(latest_start=latest_start, exclude=tries["decoder"].exclude,
                                          work_ms=lambda r: r.costs.predict(shape.num_frames, shape.num_pixels)
                                          ) as decoder:
                start = time.perf_counter()
                # Each chunk is encoded as soon as it arrives: encoding chunk 1 overlaps decoding chunk 2.
                chunks = decoder.stub.Decode(request, timeout=time_left(deadline), metadata=transport.caller_metadata())
                async for c in stream_from("decoder", decoder, chunks):
                    if not encodes:
                        first_chunk = time.perf_counter()
                        second_per_grid_t = (self.family.second_per_grid_t(c.sample_fps)
                                             if item.kind == "video" else 0.0)
                    # Chunks hold whole temporal groups, so each chunk's timestamps are its share of the item's.
                    stamps = (self.family.timestamps(list(c.frame_indices), c.video_fps)
                              if item.kind == "video" else ())
                    timestamps += stamps
                    slot = encoder_pb2.CacheSlot(
                        key=prepared.key(c.chunk_index), chunk_index=c.chunk_index, num_chunks=c.num_chunks,
                        second_per_grid_t=second_per_grid_t, first_frame=num_frames,
                        num_frames=len(c.frame_indices), timestamps=stamps)
                    num_frames += len(c.frame_indices)
                    num_pixels += math.prod(c.frames.shape[:3])
                    encodes.append(asyncio.ensure_future(self.encode_chunk(encoder_pb2.EncodeRequest(
                        request_id=request_id, kind=KINDS[item.kind], frames=c.frames, grid=c.grid,
                        cache=slot if self.cache is not None else None), prepared, deadline, latest_start,
                        tries["encoder"].exclude)))
                decoded = time.perf_counter()
                decoder.costs.observe(num_frames, num_pixels, (decoded - start) * 1e3)
            if not encodes:
                raise MediaError(f"{item.where}: the decoder returned no frames")
            replies = await asyncio.gather(*encodes)
        except BaseException:
            # Chunks already encoded will not be used: their producers may free them now, not at lease expiry.
            await transport.release([t.result().embeddings for t in encodes
                                     if t.done() and not t.cancelled() and t.exception() is None])
            raise
        finally:
            for task in encodes:
                task.cancel()  # on failure or cancellation; unclaimed tensors expire with their leases
        encoded = time.perf_counter()
        t, h, w = sum(r.grid_thw[0] for r in replies), replies[0].grid_thw[1], replies[0].grid_thw[2]
        patches = num_patches(self.family, FamilyItem(item.kind, (t, h, w)))
        self.shapes.observe(item.kind, prepared.digest, prepared.num_bytes, MediaShape(num_frames, num_pixels, patches))
        metrics.STAGE_SECONDS.labels("decode").observe(decoded - start)
        metrics.STAGE_SECONDS.labels("encode").observe(encoded - first_chunk)
        # The router only joins handles: the llm maps (or reads) the chunks' tensors itself.
        entry = CachedEmbedding(transport.concat([r.embeddings for r in replies]), (t, h, w), second_per_grid_t,
                                timestamps=tuple(timestamps))
        return Embedded(self._embedding(item.kind, entry), cached=False, decode_ms=(decoded - start) * 1e3,
                        encode_ms=(encoded - first_chunk) * 1e3, wait_ms=(start - queued) * 1e3)

    async def encode_chunk(self, request: encoder_pb2.EncodeRequest, prepared: Prepared, deadline: float,
                      latest_start: float, exclude: frozenset[str]) -> encoder_pb2.EncodeResponse:
        frame_patches = math.prod(request.frames.shape[:3]) / self.patch_side ** 2
        # Chunk i goes where chunk i of this media went last; different chunks still spread over replicas.
        affinity = f"{prepared.digest}:{request.cache.chunk_index}"
        async with self.encoders.slot(latest_start=latest_start, exclude=exclude, affinity=affinity,
                                      work_ms=lambda r: r.costs.predict(frame_patches)) as encoder:
            self.encoders.remember(affinity, encoder)
            call = encoder.stub.Encode(request, timeout=time_left(deadline),  # due: a unified replica's slice order
                                       metadata=transport.caller_metadata() + due_metadata(latest_start))
            reply = await answer_from("encoder", encoder, call)
            encoder.costs.observe(num_patches(self.family, FamilyItem(prepared.item.kind, tuple(reply.grid_thw))),
                                  encode_work_ms(reply))
            return reply

    async def _lookup(self, key: Callable[[int], str]) -> tuple[CachedEmbedding | None, int]:
        """The whole item's entry headers joined, and its number of chunks: chunk 0 says how many there are, the
        rest come in one trip. Only headers are read: the llm fetches the tensors by key."""
        (first,) = await self.cache.get_many([key(0)], header_only=True)
        if first is None or first.embeddings.dtype != self.encoder_dtype:
            return None, 0  # another dtype's entry (an encoder whose --dtype resolved otherwise) is a miss
        rest = (await self.cache.get_many([key(i) for i in range(1, first.num_chunks)], header_only=True)
                if first.num_chunks > 1 else [])
        return join_chunks([first, *rest]), first.num_chunks

    @staticmethod
    def _embedding(kind: str, entry: CachedEmbedding) -> llm_pb2.MediaEmbedding:
        return llm_pb2.MediaEmbedding(kind=KINDS[kind], embeddings=entry.embeddings,
                                      grid_thw=list(entry.grid_thw), second_per_grid_t=entry.second_per_grid_t,
                                      timestamps=list(entry.timestamps))


async def all_or_nothing(coros) -> list:
    """Runs coroutines together; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def time_left(deadline: float) -> float:
    return max(0.001, deadline - time.perf_counter())
