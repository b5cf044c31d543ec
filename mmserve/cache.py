"""Embedding cache in Redis: short timeouts, and a miss rather than an error when Redis is unwell."""

from __future__ import annotations

import dataclasses
import json
import logging
import struct

import redis.asyncio as aioredis
import redis.exceptions

from mmserve.v1 import tensor_pb2

log = logging.getLogger(__name__)

_MAGIC = b"MMEC"
_FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBI")  # magic, format version, JSON header length


@dataclasses.dataclass(frozen=True)
class CachedEmbedding:
    """One media item's vision embeddings and what the LLM needs to place them."""

    embeddings: tensor_pb2.TensorRef  # inline [num_tokens, hidden]
    grid_thw: tuple[int, int, int]
    second_per_grid_t: float


def encode_value(item: CachedEmbedding) -> bytes:
    """Serialises an entry: a small header followed by the raw tensor bytes."""
    ref = item.embeddings
    header = json.dumps({"dtype": ref.dtype, "shape": list(ref.shape), "grid_thw": list(item.grid_thw),
                         "second_per_grid_t": item.second_per_grid_t}).encode()
    return _HEADER.pack(_MAGIC, _FORMAT_VERSION, len(header)) + header + ref.inline_data


def decode_value(blob: bytes) -> CachedEmbedding | None:
    """Parses an entry; None for anything of another format or version."""
    if len(blob) < _HEADER.size:
        return None
    magic, version, n = _HEADER.unpack_from(blob)
    if magic != _MAGIC or version != _FORMAT_VERSION:
        return None
    try:
        header = json.loads(blob[_HEADER.size:_HEADER.size + n])
        ref = tensor_pb2.TensorRef(dtype=header["dtype"], shape=header["shape"],
                                   inline_data=blob[_HEADER.size + n:])
        return CachedEmbedding(ref, tuple(header["grid_thw"]), float(header["second_per_grid_t"]))
    except (ValueError, KeyError, TypeError):  # a corrupt entry is a miss, never an error
        return None


class EmbeddingCache:
    """Async Redis-backed cache; any Redis failure is logged once and reads as a miss."""

    def __init__(self, url: str, ttl_s: int = 24 * 3600, timeout_s: float = 0.05):
        self.ttl_s = ttl_s
        self.client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                              retry=None)
        self.num_errors = 0

    def _failed(self, op: str, err: Exception) -> None:
        if self.num_errors == 0:
            log.warning("embedding cache unavailable (%s: %s); computing instead", op, err)
        self.num_errors += 1

    async def get(self, key: str) -> CachedEmbedding | None:
        """The entry under key, or None on a miss or when Redis is unavailable."""
        try:
            blob = await self.client.get(key)
        except (redis.exceptions.RedisError, OSError) as err:
            self._failed("get", err)
            return None
        return decode_value(blob) if blob is not None else None

    async def put(self, key: str, item: CachedEmbedding) -> bool:
        """Stores an entry with the TTL; False when Redis is unavailable."""
        try:
            await self.client.set(key, encode_value(item), ex=self.ttl_s)
        except (redis.exceptions.RedisError, OSError) as err:
            self._failed("put", err)
            return False
        return True

    async def close(self) -> None:
        """Closes the connection pool."""
        await self.client.aclose()
