"""The encoder's dynamic batcher with a fake tower: batching, budget, cancellation, overload."""

from __future__ import annotations

import asyncio
import types

import pytest
import torch

from mmserve.media.sizing import ImageProcessing
from mmserve.models.family import MediaItem
from mmserve.models.qwen2_5_vl import Qwen25VL
from services.encoder.batcher import Batcher, EncoderOverloaded

FAMILY = Qwen25VL(ImageProcessing(), {"image_token_id": 1, "video_token_id": 2, "vision_config": {}})


class FakeTower(torch.nn.Module):
    """Implements what the batcher uses of the vision tower; records each batch it is given."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(spatial_merge_size=2)
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.dtype = torch.float32
        self.batches: list[list[tuple[int, int, int]]] = []

    def forward(self, pixel_values, grid_thw, return_dict=True):
        self.batches.append([tuple(g) for g in grid_thw.tolist()])
        # One output row per 4 patches: the patches' first column, so results are traceable.
        return types.SimpleNamespace(pooler_output=pixel_values[::4, :1] * self.weight)


def job(value: float, num_patches: int = 8) -> tuple[torch.Tensor, MediaItem]:
    return torch.full((num_patches, 3), value), MediaItem("image", (1, 2, num_patches // 2))


def make_batcher(tower, **kwargs) -> Batcher:
    return Batcher(tower, FAMILY.encode, **kwargs)


async def test_lone_request_is_encoded_at_once():
    tower = FakeTower()
    batcher = make_batcher(tower, max_batch_patches=1000, max_queue=8)
    batcher.start()
    try:
        out = (await batcher.encode(*job(3.0))).embeddings
        assert out.shape == (2, 1) and torch.all(out == 3.0)
        assert tower.batches == [[(1, 2, 4)]]
    finally:
        await batcher.stop()


async def test_requests_queued_together_share_a_batch_and_each_gets_its_own_rows():
    tower = FakeTower()
    batcher = make_batcher(tower, max_batch_patches=1000, max_queue=8)
    results = asyncio.gather(*(batcher.encode(*job(float(i))) for i in range(5)))
    await asyncio.sleep(0)  # all five queued before the worker starts
    batcher.start()
    try:
        outs = [r.embeddings for r in await results]
        assert len(tower.batches) == 1 and len(tower.batches[0]) == 5
        assert [float(o[0, 0]) for o in outs] == [0.0, 1.0, 2.0, 3.0, 4.0]
    finally:
        await batcher.stop()


async def test_the_patch_budget_splits_batches():
    tower = FakeTower()
    batcher = make_batcher(tower, max_batch_patches=16, max_queue=8)
    results = asyncio.gather(*(batcher.encode(*job(float(i))) for i in range(5)))
    await asyncio.sleep(0)
    batcher.start()
    try:
        await results
        assert [len(b) for b in tower.batches] == [2, 2, 1]
    finally:
        await batcher.stop()


async def test_cancelled_requests_are_dropped_before_encoding():
    tower = FakeTower()
    batcher = make_batcher(tower, max_batch_patches=1000, max_queue=8)
    keep = asyncio.ensure_future(batcher.encode(*job(1.0)))
    drop = asyncio.ensure_future(batcher.encode(*job(2.0, num_patches=12)))
    await asyncio.sleep(0)
    drop.cancel()
    await asyncio.sleep(0)
    batcher.start()
    try:
        await keep
        assert tower.batches == [[(1, 2, 4)]], "the cancelled request never reached the tower"
    finally:
        await batcher.stop()


async def test_full_queue_is_refused():
    batcher = make_batcher(FakeTower(), max_batch_patches=1000, max_queue=2)
    pending = [asyncio.ensure_future(batcher.encode(*job(1.0))) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(EncoderOverloaded):
        await batcher.encode(*job(1.0))
    for p in pending:
        p.cancel()
