"""The router's replica pools in plain Python: slots in least-slack order, outstanding work, replica selection."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.router.costs import TokenCost
from services.router.replicas import NoReplicaError, Replica, ReplicaPool


def make_pool(num_replicas: int, *, max_in_flight: int = 1, policy: str = "slo") -> ReplicaPool:
    """A pool of healthy fake replicas (no channels: selection and slots are pure bookkeeping)."""
    pool = ReplicaPool("encoder", stub_class=None, max_message_bytes=0, make_costs=lambda: TokenCost(1.0, 1.0),
                       policy=policy, max_in_flight=max_in_flight, unhealthy_wait_s=0.01)
    for i in range(num_replicas):
        pool.replicas[f"r{i}"] = Replica(f"r{i}", channel=None, stub=None, costs=TokenCost(1.0, 1.0), healthy=True)
    return pool


async def test_slots_are_handed_out_least_slack_first():
    pool = make_pool(1)
    order = []

    async def call(name: str, latest_start: float, hold: asyncio.Event):
        async with pool.slot(latest_start=latest_start, work_ms=lambda r: 10.0):
            order.append(name)
            await hold.wait()

    first = asyncio.Event()
    tasks = [asyncio.ensure_future(call("first", 0.0, first))]
    await asyncio.sleep(0)
    released = asyncio.Event()
    released.set()
    for name, latest_start in [("relaxed", 50.0), ("urgent", 1.0), ("middle", 20.0)]:
        tasks.append(asyncio.ensure_future(call(name, latest_start, released)))
    await asyncio.sleep(0.01)
    assert order == ["first"] and pool.num_waiting == 3
    first.set()
    await asyncio.gather(*tasks)
    assert order == ["first", "urgent", "middle", "relaxed"]
    assert pool.replicas["r0"].num_in_flight == 0 and pool.replicas["r0"].outstanding_ms == 0


async def test_a_cancelled_waiter_gives_its_turn_back():
    pool = make_pool(1)
    hold = asyncio.Event()

    async def call(latest_start: float):
        async with pool.slot(latest_start=latest_start, work_ms=lambda r: 1.0):
            await hold.wait()

    holder = asyncio.ensure_future(call(0.0))
    await asyncio.sleep(0)
    waiter = asyncio.ensure_future(call(1.0))
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.sleep(0.01)
    assert pool.num_waiting == 0
    hold.set()
    await holder
    assert pool.replicas["r0"].num_in_flight == 0


async def test_outstanding_work_returns_to_zero_though_the_cost_model_moved_during_the_calls():
    pool = make_pool(1, max_in_flight=1)
    replica = pool.replicas["r0"]
    hold = asyncio.Event()

    async def call():
        async with pool.slot(latest_start=0.0, work_ms=lambda r: r.costs.predict(100)):  # priced as the llm's
            await hold.wait()

    async def finals_arrive():  # the router learns from a reply between a slot's hand-over and its use
        await hold.wait()
        for _ in range(20):
            replica.costs.observe(100, 5.0)

    calls = [asyncio.ensure_future(call()) for _ in range(3)]  # one runs, two wait
    await asyncio.sleep(0.01)
    learner = asyncio.ensure_future(finals_arrive())
    await asyncio.sleep(0.01)
    hold.set()
    await asyncio.gather(*calls, learner)
    assert replica.num_in_flight == 0 and replica.outstanding_ms == 0.0


async def test_power_of_two_choices_prefers_the_less_loaded_replica():
    pool = make_pool(2, max_in_flight=0)
    pool.replicas["r0"].outstanding_ms = 1000.0
    for _ in range(20):
        assert pool.choose(lambda r: 10.0).address == "r1"


async def test_a_replica_that_looked_slow_is_measured_again_after_refresh_s():
    pool = make_pool(2, max_in_flight=0)
    slow, fast = pool.replicas["r0"], pool.replicas["r1"]
    predicted = {"r0": 10.0, "r1": 5.0}  # r0 looked slow once (a stall) and then got nothing to show otherwise
    fast.last_used = time.monotonic()
    slow.last_used = time.monotonic() - pool.selector.refresh_s - 1
    assert pool.choose(lambda r: predicted[r.address]) is slow
    async with pool.slot(latest_start=0.0, work_ms=lambda r: predicted[r.address]) as probed:
        assert probed is slow
        assert pool.choose(lambda r: predicted[r.address]) is fast  # one probe at a time, not a burst
    assert [pool.choose(lambda r: predicted[r.address]).address for _ in range(20)] == ["r1"] * 20


async def test_affinity_sticks_unless_that_replica_is_much_worse():
    pool = make_pool(3, max_in_flight=0)
    pool.remember("video-1", pool.replicas["r2"])
    assert pool.choose(lambda r: 10.0, affinity="video-1").address == "r2"
    pool.replicas["r2"].outstanding_ms = 10_000.0
    assert pool.choose(lambda r: 10.0, affinity="video-1").address != "r2"


async def test_fcfs_is_round_robin_without_slots():
    pool = make_pool(3, policy="fcfs", max_in_flight=0)
    picks = [pool.choose(lambda r: 0.0).address for _ in range(6)]
    assert picks == ["r0", "r1", "r2", "r0", "r1", "r2"]


async def test_unhealthy_and_excluded_replicas_get_no_work():
    pool = make_pool(2, max_in_flight=0)
    pool.replicas["r0"].healthy = False
    assert {pool.choose(lambda r: 0.0).address for _ in range(10)} == {"r1"}
    with pytest.raises(NoReplicaError):
        async with pool.slot(latest_start=0.0, work_ms=lambda r: 0.0, exclude=frozenset({"r1"})):
            pass
