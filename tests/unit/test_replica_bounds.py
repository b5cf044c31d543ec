"""Bounds of the router's replica pools: waiting calls beyond stage_max_waiting are refused, not queued."""

from __future__ import annotations

import asyncio

import pytest
from grpc_health.v1 import health_pb2

from services.router.config import RouterConfig
from services.router.costs import TokenCost
from services.router.replicas import PoolFull, Replica, ReplicaPool, keepalive_options


def _pool(max_waiting: int) -> ReplicaPool:
    pool = ReplicaPool("decoder", stub_class=None, max_message_bytes=0, make_costs=lambda: TokenCost(1.0, 1.0),
                       max_in_flight=1, max_waiting=max_waiting)
    pool.replicas["r0"] = Replica("r0", channel=None, stub=None, costs=TokenCost(1.0, 1.0), healthy=True)
    return pool


async def test_calls_beyond_the_waiting_bound_are_refused_at_once_and_the_rest_are_served():
    pool = _pool(max_waiting=2)
    release = asyncio.Event()
    served = []

    async def call(i: int):
        async with pool.slot(latest_start=float(i), work_ms=lambda r: 1.0):
            served.append(i)
            await release.wait()

    holder = asyncio.ensure_future(call(0))
    await asyncio.sleep(0)
    waiters = [asyncio.ensure_future(call(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    assert pool.num_waiting == 2
    with pytest.raises(PoolFull, match="2 decoder calls already wait"):
        await call(3)
    release.set()
    await asyncio.gather(holder, *waiters)
    assert served == [0, 1, 2] and pool.num_waiting == 0 and pool.replicas["r0"].num_in_flight == 0


def test_keepalive_options_ping_often_and_never_stop_pinging():
    options = dict(keepalive_options(1000, 2000, 3000))
    assert options["grpc.keepalive_time_ms"] == 1000
    assert options["grpc.http2.ping_timeout_ms"] == options["grpc.keepalive_timeout_ms"] == 2000
    assert options["grpc.http2.max_pings_without_data"] == 0  # gRPC's default stops after two
    assert options["grpc.max_reconnect_backoff_ms"] == 3000


def test_router_config_checks_the_new_bounds():
    common = dict(model="/m", decoder_addrs="a:1", encoder_addrs="a:2", llm_addrs="a:3")
    with pytest.raises(ValueError, match="replica_keepalive_ms"):
        RouterConfig(replica_keepalive_ms=100, **common)
    with pytest.raises(ValueError, match="stage_max_waiting"):
        RouterConfig(stage_max_waiting=0, **common)


@pytest.mark.parametrize("reconnect_max_ms, longest_s", [(100, 0.1), (2000, 1.0)])
async def test_a_replica_not_serving_yet_is_checked_again_within_the_reconnect_bound(monkeypatch, reconnect_max_ms,
                                                                                      longest_s):
    """`mmserve up` sets 100 ms: a stage that starts serving is seen within that, not after a second's pause."""
    from mmserve.v1 import decoder_pb2_grpc
    from services.router import replicas

    pauses = []
    sleep = asyncio.sleep

    async def recorded(delay, *args):
        pauses.append(delay)
        if len(pauses) == 8:
            raise asyncio.CancelledError
        await sleep(0)

    monkeypatch.setattr(replicas.asyncio, "sleep", recorded)
    pool = ReplicaPool("decoder", stub_class=decoder_pb2_grpc.DecoderStub, max_message_bytes=1 << 20,
                       make_costs=lambda: TokenCost(1.0, 1.0),
                       channel_options=keepalive_options(10_000, 1_000, reconnect_max_ms))
    pool.add("127.0.0.1:1")  # nothing listens there: every health Watch fails
    with pytest.raises(asyncio.CancelledError):
        await pool.replicas["127.0.0.1:1"].watcher
    await pool.close()
    assert pauses[0] == 0.05 and max(pauses) == longest_s


async def test_a_replica_is_healthy_only_while_its_own_stage_serves_there(health_server):
    """A decoder address that reaches another stage's process is withdrawn, not called (UNIMPLEMENTED)."""
    address, servicer = health_server
    for name in ("", "mmserve.v1.Encoder"):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    pool = ReplicaPool("decoder", stub_class=lambda channel: None, max_message_bytes=1 << 20,
                       make_costs=lambda: TokenCost(1.0, 1.0))
    pool.add(address)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pool.wait_healthy(10.0), 1.0)
        servicer.set("mmserve.v1.Decoder", health_pb2.HealthCheckResponse.SERVING)
        await asyncio.wait_for(pool.wait_healthy(10.0), 10.0)
        assert [r.address for r in pool.healthy()] == [address]
    finally:
        await pool.close()
