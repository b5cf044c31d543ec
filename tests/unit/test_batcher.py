"""The encoder's dynamic batcher with a fake tower: batching, budget, earliest due first, batches within the most
urgent job's slack, each job's share of the tower's time, cancellation, overload."""

from __future__ import annotations

import asyncio
import time
import types

import pytest
import torch

from mmserve.media.sizing import ImageProcessing
from mmserve.models.family import MediaItem
from mmserve.models.qwen2_5_vl import Qwen25VL
from services.encoder.batcher import Batcher, EncoderOverloaded
from services.router.server import RouterServicer
from services.unified.deadlines import due_metadata

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
        out = (await batcher.encode(*job(3.0))).item.embeddings
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
        outs = [r.item.embeddings for r in await results]
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


async def test_each_job_is_charged_its_share_of_its_batch_and_not_its_wait(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("services.encoder.batcher.time.perf_counter", lambda: clock[0])

    class TimedTower(FakeTower):
        def forward(self, pixel_values, grid_thw, return_dict=True):
            clock[0] += 0.010  # every batch takes 10 ms, whatever its size
            return super().forward(pixel_values, grid_thw, return_dict)

    batcher = make_batcher(TimedTower(), max_batch_patches=16, max_queue=8)
    results = asyncio.gather(batcher.encode(*job(1.0, 4)), batcher.encode(*job(2.0, 12)),
                             batcher.encode(*job(3.0, 16)))
    await asyncio.sleep(0)
    batcher.start()
    try:
        assert [r.tower_ms for r in await results] == pytest.approx([2.5, 7.5, 10.0])  # the last waited 10 ms
    finally:
        await batcher.stop()


async def test_the_queue_is_served_earliest_due_first_and_in_arrival_order_among_equals():
    tower = FakeTower()
    batcher = make_batcher(tower, max_batch_patches=16, max_queue=8)
    soon = time.time() + 100.0  # slack enough for any batch
    due = {8: 3.0, 12: 1.0, 16: 2.0, 4: 3.0}  # num_patches: due time; the 4 came after the 8, due as late
    results = asyncio.gather(*(batcher.encode(*job(1.0, n), due=soon + d) for n, d in due.items()))
    await asyncio.sleep(0)
    batcher.start()
    try:
        await results
        assert tower.batches == [[(1, 2, 6)], [(1, 2, 8)], [(1, 2, 4), (1, 2, 2)]]
    finally:
        await batcher.stop()


async def test_companions_take_at_most_half_the_slack_of_the_job_due_first(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("services.encoder.batcher.time.perf_counter", lambda: clock[0])
    monkeypatch.setattr("services.encoder.batcher.time.time", lambda: clock[0])

    class TimedTower(FakeTower):
        def forward(self, pixel_values, grid_thw, return_dict=True):
            clock[0] += 0.001 * pixel_values.shape[0]  # 1 ms per patch, as on a CPU: a batch saves nothing
            return super().forward(pixel_values, grid_thw, return_dict)

    tower = TimedTower()
    batcher = make_batcher(tower, max_batch_patches=1000, max_queue=8)
    batcher.start()
    try:
        await batcher.encode(*job(1.0, 8))  # the tower measured: 1 ms per patch
        assert batcher.ms_per_patch == pytest.approx(1.0)
        tower.batches.clear()
        now = clock[0]
        urgent = batcher.encode(*job(2.0, 8), due=now + 0.020)  # 20 ms of slack: 10 for company, 8 patches fit
        later = [batcher.encode(*job(3.0, 8), due=now + 1.0) for _ in range(2)]
        await asyncio.gather(urgent, *later)
        assert tower.batches == [[(1, 2, 4)] * 2, [(1, 2, 4)]]
        tower.batches.clear()
        now = clock[0]
        urgent = batcher.encode(*job(2.0, 8), due=now + 0.014)  # 7 ms for company: 8 patches do not fit
        await asyncio.gather(urgent, batcher.encode(*job(3.0, 8), due=now + 1.0))
        assert tower.batches == [[(1, 2, 4)], [(1, 2, 4)]]
        tower.batches.clear()
        await asyncio.gather(*(batcher.encode(*job(4.0, 8)) for _ in range(3)))  # no due time: whatever fits
        assert tower.batches == [[(1, 2, 4)] * 3]
    finally:
        await batcher.stop()


@pytest.mark.parametrize("policy, sends_due", [("slo", True), ("fcfs", False)])
def test_the_router_sends_an_encode_its_due_time_under_the_slo_policy_only(policy, sends_due):
    router = types.SimpleNamespace(config=types.SimpleNamespace(policy=policy))
    ticket = types.SimpleNamespace(latest_start=123.0)
    assert bool(due_metadata(RouterServicer._latest_start(router, ticket))) == sends_due  # fcfs: arrival order
