"""EmbeddingCache against a real redis-server: pipelined chunk reads and writes, TTL, the local LRU, metrics,
and a killed or paused Redis reading as a miss (logged once per outage)."""

from __future__ import annotations

import logging
import os
import signal

import prometheus_client
import pytest
import redis
import torch

from mmserve.cache import CachedEmbedding, EmbeddingCache
from mmserve.transport import from_ref, to_inline
from tests.conftest import RedisServer


@pytest.fixture
def own_redis(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


def entry(i: int, n: int = 3) -> CachedEmbedding:
    return CachedEmbedding(to_inline(torch.full((6, 8), float(i))), (1, 4, 6), 0.5, i, n, 2 * i, 2)


def metric(name: str, **labels) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_chunks_round_trip_with_ttl(own_redis):
    cache = EmbeddingCache(own_redis.url, ttl_s=300)
    try:
        keys = [f"k{i}" for i in range(3)]
        assert await cache.put_many([(k, entry(i)) for i, k in enumerate(keys)])
        found = await cache.get_many([*keys, "absent"])
        assert found[3] is None
        for i, item in enumerate(found[:3]):
            assert (item.chunk_index, item.num_chunks, item.first_frame, item.num_frames) == (i, 3, 2 * i, 2)
            assert torch.equal(from_ref(item.embeddings), torch.full((6, 8), float(i)))
        assert 0 < redis.Redis(port=own_redis.port).ttl("k0") <= 300
    finally:
        await cache.close()


async def test_local_lru_answers_without_redis(own_redis):
    cache = EmbeddingCache(own_redis.url, local_bytes=1 << 20)
    try:
        await cache.put("k", entry(0))
        before = metric("mmserve_embedding_cache_lookups_total", result="local_hit")
        assert await cache.get("k") is not None  # from Redis, now also local
        redis.Redis(port=own_redis.port).flushall()
        assert await cache.get("k") is not None
        assert metric("mmserve_embedding_cache_lookups_total", result="local_hit") == before + 1
    finally:
        await cache.close()


async def test_killed_redis_is_a_miss_logged_once_then_recovers(own_redis, caplog):
    cache = EmbeddingCache(own_redis.url, timeout_s=0.05)
    try:
        await cache.put("k", entry(0))
        errors = metric("mmserve_embedding_cache_errors_total", op="get")
        own_redis.stop()
        with caplog.at_level(logging.WARNING, logger="mmserve.cache"):
            assert await cache.get("k") is None
            assert await cache.get_many(["k", "j"]) == [None, None]
            assert await cache.put("k", entry(1)) is False
        assert len(caplog.records) == 1 and "unavailable" in caplog.records[0].message
        assert metric("mmserve_embedding_cache_errors_total", op="get") == errors + 2
        caplog.clear()
        own_redis.start()  # same port, empty
        with caplog.at_level(logging.WARNING, logger="mmserve.cache"):
            assert await cache.put("k", entry(2))
            assert from_ref((await cache.get("k")).embeddings)[0, 0] == 2.0
        assert "available again" in caplog.text
    finally:
        await cache.close()


async def test_paused_redis_is_a_miss_not_a_hang(own_redis):
    cache = EmbeddingCache(own_redis.url, timeout_s=0.05)
    try:
        await cache.put("k", entry(0))
        os.kill(own_redis.process.pid, signal.SIGSTOP)
        try:
            assert await cache.get("k") is None
            assert await cache.put("j", entry(1)) is False
            assert cache.num_errors == 2
        finally:
            os.kill(own_redis.process.pid, signal.SIGCONT)
        assert await cache.get("k") is not None
    finally:
        await cache.close()
