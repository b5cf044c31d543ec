"""Embedding cache: Redis (pipelined, short timeouts, TTL) behind a small in-process LRU; Redis trouble is a miss."""

from __future__ import annotations

import dataclasses
import json
import logging
import struct

import prometheus_client
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from mmserve import registry, transport
from mmserve.lru import ByteLRU
from mmserve.v1 import tensor_pb2

log = logging.getLogger(__name__)

_MAGIC = b"MMEC"
_FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBI")  # magic, format version, JSON header length
_PEEK_BYTES = 4096  # an entry's header fits: a router reads no tensor bytes

LOOKUPS = prometheus_client.Counter("mmserve_embedding_cache_lookups", "Embedding cache lookups by result",
                                    ["result"])  # local_hit, hit, miss
WRITES = prometheus_client.Counter("mmserve_embedding_cache_writes", "Embedding cache entries written")
ERRORS = prometheus_client.Counter("mmserve_embedding_cache_errors", "Redis failures read as misses", ["op"])


@dataclasses.dataclass(frozen=True)
class CachedEmbedding:
    """One temporal chunk's (or a whole image's) vision embeddings and what the LLM needs to place them."""

    embeddings: tensor_pb2.TensorRef  # inline packed [num_tokens, hidden * (1 + DeepStack)]; dtype, shape if peeked
    grid_thw: tuple[int, int, int]  # of this chunk (the family's grid)
    second_per_grid_t: float
    chunk_index: int = 0
    num_chunks: int = 1
    first_frame: int = 0  # position of the chunk's first frame in the sampled sequence
    num_frames: int = 0
    timestamps: tuple[float, ...] = ()  # seconds of each temporal group, where the family writes them (Qwen3-VL)


def join_chunks(chunks: list[CachedEmbedding | None]) -> CachedEmbedding | None:
    """One media item's entry from its chunk entries in index order; None unless they tile it exactly.

    Chunking can differ between decodes, so chunk i of one decode may sit next to chunk i + 1 of another:
    only entries that agree on the chunk count and cover contiguous frames from the start make a hit.
    """
    if not chunks or any(c is None for c in chunks):
        return None
    first = chunks[0]
    frame = 0
    for i, c in enumerate(chunks):
        if (c.num_chunks != len(chunks) or c.chunk_index != i or c.first_frame != frame
                or c.grid_thw[1:] != first.grid_thw[1:] or c.second_per_grid_t != first.second_per_grid_t
                or c.embeddings.dtype != first.embeddings.dtype
                or list(c.embeddings.shape[1:]) != list(first.embeddings.shape[1:])):
            return None
        frame += c.num_frames
    if len(chunks) == 1:
        return first
    grid = (sum(c.grid_thw[0] for c in chunks), *first.grid_thw[1:])
    joined = transport.concat([c.embeddings for c in chunks])
    return CachedEmbedding(joined, grid, first.second_per_grid_t, 0, 1, 0, frame,
                           tuple(t for c in chunks for t in c.timestamps))


def fits_window(entry: CachedEmbedding | None, chunk_index: int, num_chunks: int, first_frame: int, num_rows: int,
                dtype: str) -> bool:
    """Whether an entry is chunk chunk_index of num_chunks fixed windows starting at first_frame, num_rows rows of
    dtype: a window's entry stands alone (no neighbours to agree with), so its header must match the plan."""
    return (entry is not None and entry.chunk_index == chunk_index and entry.num_chunks == num_chunks
            and entry.first_frame == first_frame and entry.embeddings.dtype == dtype
            and len(entry.embeddings.shape) == 2 and entry.embeddings.shape[0] == num_rows)


def encode_value(item: CachedEmbedding) -> bytes:
    """Serialises an entry: a small header followed by the raw tensor bytes."""
    ref = item.embeddings
    header = json.dumps({"dtype": ref.dtype, "shape": list(ref.shape), "grid_thw": list(item.grid_thw),
                         "second_per_grid_t": item.second_per_grid_t, "chunk_index": item.chunk_index,
                         "num_chunks": item.num_chunks, "first_frame": item.first_frame,
                         "num_frames": item.num_frames, "timestamps": list(item.timestamps)}).encode()
    return _HEADER.pack(_MAGIC, _FORMAT_VERSION, len(header)) + header + ref.inline_data


def decode_value(blob: bytes, header_only: bool = False) -> CachedEmbedding | None:
    """Parses an entry (or, header_only, a prefix holding its header: the ref then has no bytes); None for
    anything of another format or version, or corrupt."""
    if len(blob) < _HEADER.size:
        return None
    magic, version, n = _HEADER.unpack_from(blob)
    if magic != _MAGIC or version != _FORMAT_VERSION or len(blob) < _HEADER.size + n:
        return None
    try:
        h = json.loads(blob[_HEADER.size:_HEADER.size + n])
        grid = tuple(int(x) for x in h["grid_thw"])
        ref = tensor_pb2.TensorRef(dtype=h["dtype"], shape=[int(x) for x in h["shape"]])
        if not header_only:
            ref.inline_data = blob[_HEADER.size + n:]
        item = CachedEmbedding(ref, grid, float(h["second_per_grid_t"]), int(h.get("chunk_index", 0)),
                               int(h.get("num_chunks", 1)), int(h.get("first_frame", 0)),
                               int(h.get("num_frames", 0)), tuple(float(t) for t in h.get("timestamps", ())))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return item if len(grid) == 3 and 0 <= item.chunk_index < item.num_chunks else None


class EmbeddingCache:
    """Async cache client; any Redis failure is logged once per outage, counted, and reads as a miss."""

    def __init__(self, url: str, ttl_s: int = 24 * 3600, timeout_s: float = 0.05, local_bytes: int = 0,
                 password: str | None = None):
        self.ttl_s = ttl_s
        # One immediate retry on a broken connection only: after a Redis restart the pooled socket is dead, and
        # a reader that saw no outage (an llm serving from its LRU) would otherwise miss once. A timeout (Redis
        # slow or paused) is never retried: it stays a fast miss.
        retry = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
        self.client = aioredis.Redis.from_url(url, password=password, socket_timeout=timeout_s,
                                              socket_connect_timeout=timeout_s, retry=retry)
        self.local: ByteLRU[CachedEmbedding] = ByteLRU(local_bytes)
        self.num_errors = 0
        self._failing = False

    def _failed(self, op: str, err: Exception) -> None:
        if not self._failing:
            log.warning("embedding cache unavailable (%s: %s); computing instead", op, err)
            self._failing = True
        self.num_errors += 1
        ERRORS.labels(op).inc()

    def _succeeded(self) -> None:
        if self._failing:
            log.warning("embedding cache available again")
            self._failing = False

    @classmethod
    def from_options(cls, options) -> EmbeddingCache | None:
        """The cache a service's CacheOptions describe, or None when it has no redis_url."""
        if not options.redis_url:
            return None
        return cls(options.redis_url, options.cache_ttl_s, options.cache_timeout_ms / 1e3, options.cache_local_bytes,
                   registry.redis_password(options))

    async def get_many(self, keys: list[str], header_only: bool = False) -> list[CachedEmbedding | None]:
        """The entries under keys (None for each miss), from the local LRU, else one Redis round trip.

        header_only reads just each entry's header (the embeddings ref carries dtype and shape, no bytes): what
        a router needs to tell a hit and send the llm the keys.
        """
        local_keys = [f"{k}#header" if header_only else k for k in keys]
        found = [self.local.get(k) for k in local_keys]
        LOOKUPS.labels("local_hit").inc(sum(f is not None for f in found))
        missing = [i for i, f in enumerate(found) if f is None]
        if not missing:
            return found
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for i in missing:
                    if header_only:
                        pipe.getrange(keys[i], 0, _PEEK_BYTES - 1)
                    else:
                        pipe.get(keys[i])
                blobs = await pipe.execute()
        except (redis.exceptions.RedisError, OSError) as err:
            self._failed("get", err)
            LOOKUPS.labels("miss").inc(len(missing))
            return found
        self._succeeded()
        for i, blob in zip(missing, blobs):
            item = decode_value(blob, header_only) if blob else None  # GETRANGE of no key is b""
            LOOKUPS.labels("hit" if item is not None else "miss").inc()
            if item is not None:
                found[i] = item
                self.local.put(local_keys[i], item, len(blob))
        return found

    async def put_many(self, items: list[tuple[str, CachedEmbedding]]) -> bool:
        """Stores entries with the TTL in one round trip; False when Redis is unavailable."""
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key, item in items:
                    pipe.set(key, encode_value(item), ex=self.ttl_s)
                await pipe.execute()
        except (redis.exceptions.RedisError, OSError) as err:
            self._failed("put", err)
            return False
        self._succeeded()
        WRITES.inc(len(items))
        return True

    async def get(self, key: str) -> CachedEmbedding | None:
        """The entry under key, or None on a miss or when Redis is unavailable."""
        return (await self.get_many([key]))[0]

    async def put(self, key: str, item: CachedEmbedding) -> bool:
        """Stores an entry with the TTL; False when Redis is unavailable."""
        return await self.put_many([(key, item)])

    async def close(self) -> None:
        """Closes the connection pool."""
        await self.client.aclose()
