"""The llm's side of embeddings by cache key: one cache round trip for every key, chunks joined in order, and a
missing or mismatched entry read as evicted (NOT_FOUND, which makes the router compute the media again)."""

from __future__ import annotations

import pytest
import torch

from mmserve.cache import CachedEmbedding, EmbeddingCache
from mmserve.transport import from_ref, to_inline
from mmserve.v1 import decoder_pb2, llm_pb2
from services.llm import __main__ as llm_main
from services.llm.config import LlmConfig
from services.llm.server import EmbeddingsEvicted, cached_refs


class DictCache:
    """The EmbeddingCache read interface over a dict, counting round trips."""

    def __init__(self, entries: dict[str, CachedEmbedding]):
        self.entries = entries
        self.num_calls = 0

    async def get_many(self, keys: list[str]) -> list[CachedEmbedding | None]:
        self.num_calls += 1
        return [self.entries.get(k) for k in keys]


def chunk(i: int, n: int, rows: int = 4) -> CachedEmbedding:
    return CachedEmbedding(to_inline(torch.full((rows, 8), float(i))), (1, 2, 8), 0.5, i, n, 2 * i, 2)


def by_keys(*keys: str, grid=(2, 2, 8)) -> llm_pb2.MediaEmbedding:
    return llm_pb2.MediaEmbedding(kind=decoder_pb2.MEDIA_KIND_VIDEO, grid_thw=list(grid), cache_keys=list(keys))


async def test_chunks_are_joined_in_order_in_one_round_trip():
    cache = DictCache({"a0": chunk(0, 2), "a1": chunk(1, 2), "b0": chunk(0, 1)})
    inline = llm_pb2.MediaEmbedding(kind=decoder_pb2.MEDIA_KIND_IMAGE, grid_thw=[1, 2, 2],
                                    embeddings=to_inline(torch.ones(1, 8)))
    refs = await cached_refs(cache, [by_keys("a0", "a1"), inline, by_keys("b0", grid=(1, 2, 8))])
    assert cache.num_calls == 1
    assert from_ref(refs[0])[:, 0].tolist() == [0.0] * 4 + [1.0] * 4
    assert refs[1] == inline.embeddings
    assert from_ref(refs[2]).shape == (4, 8)


async def test_refs_alone_need_no_cache():
    media = llm_pb2.MediaEmbedding(kind=decoder_pb2.MEDIA_KIND_IMAGE, grid_thw=[1, 2, 2],
                                   embeddings=to_inline(torch.ones(1, 8)))
    assert await cached_refs(None, [media]) == [media.embeddings]


@pytest.mark.parametrize("entries, media", [
    ({"a0": chunk(0, 2)}, by_keys("a0", "a1")),  # chunk 1 evicted
    ({"a0": chunk(0, 2), "a1": chunk(1, 2)}, by_keys("a0", "a1", grid=(3, 2, 8))),  # not the grid we were told
    ({"a1": chunk(1, 2), "a0": chunk(0, 2)}, by_keys("a1", "a0")),  # out of order
], ids=["evicted", "grid", "order"])
async def test_what_does_not_make_the_item_reads_as_evicted(entries, media):
    with pytest.raises(EmbeddingsEvicted, match="evicted"):
        await cached_refs(DictCache(entries), [media])


async def test_keys_without_a_cache_say_so():
    with pytest.raises(EmbeddingsEvicted, match="redis-url"):
        await cached_refs(None, [by_keys("a0")])


class FakeEngine:
    """Engine's lifecycle without a model."""

    is_running = False

    def start(self) -> None:
        self.is_running = True

    def stop(self) -> None:
        self.is_running = False


async def test_stopping_the_llm_stops_its_engine_and_closes_its_cache_client(monkeypatch):
    engine = FakeEngine()
    monkeypatch.setattr(llm_main, "Engine", lambda config, arbiter=None: engine)
    closed: list[EmbeddingCache] = []
    real_close = EmbeddingCache.close

    async def close(cache: EmbeddingCache) -> None:
        closed.append(cache)
        await real_close(cache)

    monkeypatch.setattr(EmbeddingCache, "close", close)
    # Nothing listens on the port: the client connects lazily, so building and closing it needs no Redis.
    role = await llm_main.build_llm(LlmConfig(model="tiny", redis_url="redis://127.0.0.1:1/0"))
    assert engine.is_running and not closed
    await role.stop()
    assert not engine.is_running
    assert len(closed) == 1
