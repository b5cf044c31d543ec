"""Chunk entries join into one media item only when they tile it exactly; the byte-bounded LRU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmserve.cache import CachedEmbedding, decode_value, encode_value, join_chunks
from mmserve.lru import ByteLRU
from mmserve.transport import from_ref, to_inline


def chunk(i: int, n: int, first: int, frames: int = 4, hw=(4, 6), spgt=1.0, hidden=8) -> CachedEmbedding:
    t = frames // 2
    rows = t * hw[0] * hw[1] // 4
    emb = torch.full((rows, hidden), float(i))
    return CachedEmbedding(to_inline(emb), (t, *hw), spgt, i, n, first, frames)


def test_one_chunk_is_itself():
    c = chunk(0, 1, 0)
    assert join_chunks([c]) is c


def test_chunks_join_in_order():
    joined = join_chunks([chunk(0, 3, 0), chunk(1, 3, 4, frames=6), chunk(2, 3, 10)])
    assert joined.grid_thw == (2 + 3 + 2, 4, 6)
    assert joined.second_per_grid_t == 1.0
    rows = from_ref(joined.embeddings)
    assert rows.shape == (7 * 6, 8)
    assert rows[:, 0].tolist() == [0.0] * 12 + [1.0] * 18 + [2.0] * 12


@pytest.mark.parametrize("chunks", [
    [],
    [None],
    [chunk(0, 2, 0), None],
    [chunk(0, 2, 0)],  # chunk 1 missing
    [chunk(0, 2, 0), chunk(1, 3, 4)],  # chunk 1 of another split
    [chunk(0, 2, 0), chunk(1, 2, 6)],  # gap: chunk 0 of one split next to chunk 1 of another
    [chunk(0, 2, 0, frames=6), chunk(1, 2, 4)],  # overlap
    [chunk(1, 2, 4), chunk(0, 2, 0)],  # out of order
    [chunk(0, 1, 2)],  # does not start at frame 0
    [chunk(0, 2, 0), chunk(1, 2, 4, hw=(6, 4))],
    [chunk(0, 2, 0), chunk(1, 2, 4, spgt=0.5)],
    [chunk(0, 2, 0), chunk(1, 2, 4, hidden=16)],
], ids=["empty", "none", "one-missing", "short", "other-count", "gap", "overlap", "order", "offset", "hw",
        "spgt", "hidden"])
def test_chunks_that_do_not_tile_the_item_are_a_miss(chunks):
    assert join_chunks(chunks) is None


def test_chunk_fields_survive_the_value_format():
    c = chunk(2, 5, 12, frames=6)
    back = decode_value(encode_value(c))
    assert dataclasses.replace(back, embeddings=None) == dataclasses.replace(c, embeddings=None)


def test_value_claiming_an_impossible_chunk_index_is_none():
    assert decode_value(encode_value(chunk(3, 2, 0))) is None


def test_lru_evicts_least_recently_used_by_bytes():
    lru = ByteLRU(100)
    lru.put("a", 1, 40)
    lru.put("b", 2, 40)
    assert lru.get("a") == 1  # b is now the oldest
    lru.put("c", 3, 40)
    assert lru.get("b") is None and lru.get("a") == 1 and lru.get("c") == 3
    assert lru.num_bytes == 80 and len(lru) == 2


def test_lru_replaces_and_refuses_oversized_values():
    lru = ByteLRU(100)
    lru.put("a", 1, 60)
    lru.put("a", 2, 30)
    assert lru.get("a") == 2 and lru.num_bytes == 30
    lru.put("huge", 3, 101)
    assert lru.get("huge") is None and lru.get("a") == 2


def test_lru_of_zero_bytes_keeps_nothing():
    lru = ByteLRU(0)
    lru.put("a", 1, 1)
    assert lru.get("a") is None and len(lru) == 0
