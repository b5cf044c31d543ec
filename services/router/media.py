"""The media half of a request: cache lookup per chunk, else decode → encode (the encoder writes the cache)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import time

from mmserve import transport
from mmserve.cache import CachedEmbedding, EmbeddingCache, join_chunks
from mmserve.cache_keys import MediaParams, media_key
from mmserve.media import preprocess as pp
from mmserve.media.fetch import read_uri
from mmserve.v1 import api_pb2, decoder_pb2, encoder_pb2, llm_pb2
from services.router.replicas import ReplicaPool

_KINDS = {"image": decoder_pb2.MEDIA_KIND_IMAGE, "video": decoder_pb2.MEDIA_KIND_VIDEO}


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


class MediaStage:
    """Turns one media item into embeddings the LLM can splice in."""

    def __init__(self, *, decoders: ReplicaPool, encoders: ReplicaPool, cache: EmbeddingCache | None,
                 model_id: str, processing: pp.ImageProcessing, media_root: str, max_media_bytes: int):
        self.decoders = decoders
        self.encoders = encoders
        self.cache = cache
        self.model_id = model_id
        self.processing = processing
        self.media_root = media_root
        self.max_media_bytes = max_media_bytes

    def params(self, item: MediaItem) -> MediaParams:
        """The effective preprocessing parameters: request overrides, else the model's defaults."""
        m = item.media
        if item.kind == "image":
            return MediaParams(
                "image",
                min_pixels=m.min_pixels if m.HasField("min_pixels") else self.processing.min_pixels,
                max_pixels=m.max_pixels if m.HasField("max_pixels") else self.processing.max_pixels)
        return MediaParams(
            "video",
            fps=m.fps if m.HasField("fps") else pp.FPS,
            min_frames=pp.FPS_MIN_FRAMES,
            max_frames=m.max_frames if m.HasField("max_frames") else pp.FPS_MAX_FRAMES,
            min_pixels=m.min_pixels if m.HasField("min_pixels") else pp.VIDEO_MIN_PIXELS,
            max_pixels=m.max_pixels if m.HasField("max_pixels") else pp.VIDEO_MAX_PIXELS,
            total_pixels=pp.VIDEO_TOTAL_PIXELS)

    async def _read(self, item: MediaItem) -> bytes:
        if item.media.WhichOneof("source") == "data":
            return item.media.data
        try:
            return await asyncio.to_thread(read_uri, item.media.uri, media_root=self.media_root,
                                           max_bytes=self.max_media_bytes)
        except pp.MediaError as err:
            raise pp.MediaError(f"{item.where}.{err}") from None

    async def embed(self, request_id: str, item: MediaItem, timeout_s: float) -> Embedded:
        """Embeddings for item: every chunk from the cache, else decoded and encoded (the encoder writes the cache)."""
        data = await self._read(item)
        params = self.params(item)
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        key = functools.partial(media_key, digest, self.model_id, params)
        if self.cache is not None and (hit := await self._lookup(key)) is not None:
            return Embedded(self._embedding(item.kind, hit), cached=True)
        start = time.perf_counter()
        request = decoder_pb2.DecodeRequest(
            request_id=request_id, kind=_KINDS[item.kind], data=data, fps=params.fps,
            min_frames=params.min_frames, max_frames=params.max_frames, min_pixels=params.min_pixels,
            max_pixels=params.max_pixels, total_pixels=params.total_pixels)
        encodes: list[asyncio.Future] = []
        first_chunk = second_per_grid_t = 0.0
        num_frames = 0
        try:
            # Each chunk is encoded as soon as it arrives: encoding chunk 1 overlaps decoding chunk 2.
            chunks = self.decoders.pick().Decode(request, timeout=timeout_s, metadata=transport.caller_metadata())
            async for c in chunks:
                if not encodes:
                    first_chunk = time.perf_counter()
                    second_per_grid_t = (self.processing.temporal_patch_size / c.sample_fps
                                         if item.kind == "video" else 0.0)
                slot = encoder_pb2.CacheSlot(
                    key=key(c.chunk_index), chunk_index=c.chunk_index, num_chunks=c.num_chunks,
                    second_per_grid_t=second_per_grid_t, first_frame=num_frames, num_frames=len(c.frame_indices))
                num_frames += len(c.frame_indices)
                encodes.append(asyncio.ensure_future(self.encoders.pick().Encode(encoder_pb2.EncodeRequest(
                    request_id=request_id, kind=_KINDS[item.kind], frames=c.frames,
                    cache=slot if self.cache is not None else None),
                    timeout=timeout_s, metadata=transport.caller_metadata())))
            decoded = time.perf_counter()
            if not encodes:
                raise pp.MediaError(f"{item.where}: the decoder returned no frames")
            replies = await asyncio.gather(*encodes)
        finally:
            for task in encodes:
                task.cancel()  # on failure or cancellation; unclaimed tensors expire with their leases
        encoded = time.perf_counter()
        t, h, w = sum(r.grid_thw[0] for r in replies), replies[0].grid_thw[1], replies[0].grid_thw[2]
        # The router only joins handles: the llm maps (or reads) the chunks' tensors itself.
        entry = CachedEmbedding(transport.concat([r.embeddings for r in replies]), (t, h, w), second_per_grid_t)
        return Embedded(self._embedding(item.kind, entry), cached=False,
                        decode_ms=(decoded - start) * 1e3, encode_ms=(encoded - first_chunk) * 1e3)

    async def _lookup(self, key) -> CachedEmbedding | None:
        """The whole item from its chunk entries: chunk 0 says how many there are, the rest come in one trip."""
        (first,) = await self.cache.get_many([key(0)])
        if first is None:
            return None
        rest = await self.cache.get_many([key(i) for i in range(1, first.num_chunks)]) if first.num_chunks > 1 else []
        return join_chunks([first, *rest])

    @staticmethod
    def _embedding(kind: str, entry: CachedEmbedding) -> llm_pb2.MediaEmbedding:
        return llm_pb2.MediaEmbedding(kind=_KINDS[kind], embeddings=entry.embeddings,
                                      grid_thw=list(entry.grid_thw), second_per_grid_t=entry.second_per_grid_t)
