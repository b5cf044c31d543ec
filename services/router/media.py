"""The media half of a request: cache lookup, else decode → encode, then cache write."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time

from mmserve.cache import CachedEmbedding, EmbeddingCache
from mmserve.cache_keys import MediaParams, media_key
from mmserve.media import preprocess as pp
from mmserve.media.fetch import read_uri
from mmserve.v1 import api_pb2, decoder_pb2, encoder_pb2, llm_pb2, tensor_pb2
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
        """Embeddings for item, from the cache when possible."""
        data = await self._read(item)
        params = self.params(item)
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        key = media_key(digest, self.model_id, params)
        if self.cache is not None and (hit := await self.cache.get(key)) is not None:
            return Embedded(self._embedding(item.kind, hit), cached=True)
        start = time.perf_counter()
        request = decoder_pb2.DecodeRequest(
            request_id=request_id, kind=_KINDS[item.kind], data=data, fps=params.fps,
            min_frames=params.min_frames, max_frames=params.max_frames, min_pixels=params.min_pixels,
            max_pixels=params.max_pixels, total_pixels=params.total_pixels)
        chunks = [c async for c in self.decoders.pick().Decode(request, timeout=timeout_s)]
        decoded = time.perf_counter()
        # Temporal chunks encode independently (vision attention stays within a temporal patch).
        replies = await asyncio.gather(*(
            self.encoders.pick().Encode(encoder_pb2.EncodeRequest(
                request_id=request_id, kind=_KINDS[item.kind], frames=c.frames), timeout=timeout_s)
            for c in chunks))
        encoded = time.perf_counter()
        t, h, w = sum(r.grid_thw[0] for r in replies), replies[0].grid_thw[1], replies[0].grid_thw[2]
        second_per_grid_t = (self.processing.temporal_patch_size / chunks[0].sample_fps
                             if item.kind == "video" else 0.0)
        entry = CachedEmbedding(_concat([r.embeddings for r in replies]), (t, h, w), second_per_grid_t)
        if self.cache is not None:
            await self.cache.put(key, entry)
        return Embedded(self._embedding(item.kind, entry), cached=False,
                        decode_ms=(decoded - start) * 1e3, encode_ms=(encoded - decoded) * 1e3)

    @staticmethod
    def _embedding(kind: str, entry: CachedEmbedding) -> llm_pb2.MediaEmbedding:
        return llm_pb2.MediaEmbedding(kind=_KINDS[kind], embeddings=entry.embeddings,
                                      grid_thw=list(entry.grid_thw), second_per_grid_t=entry.second_per_grid_t)


def _concat(refs: list[tensor_pb2.TensorRef]) -> tensor_pb2.TensorRef:
    """Concatenates inline tensors along dim 0 (row-major bytes simply follow each other)."""
    if len(refs) == 1:
        return refs[0]
    shape = [sum(r.shape[0] for r in refs), *refs[0].shape[1:]]
    return tensor_pb2.TensorRef(dtype=refs[0].dtype, shape=shape,
                                inline_data=b"".join(r.inline_data for r in refs))
