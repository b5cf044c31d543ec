"""Replicas found through the Redis registry; kill -9 of replicas under load; nothing is silently lost."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import grpc
import pytest

from mmserve.media.samples import make_image
from mmserve.transport import shm
from tests.integration.cluster import Cluster, replica, started_cluster
from tests.integration.helpers import collect, image, request, text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tiny_model, redis_server):
    running = started_cluster(tiny_model, redis_server)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def cluster_router(cluster):
    stub, channel = cluster.stub()
    yield stub
    channel.close()


def _healthy(cluster: Cluster, stage: str) -> float:
    return cluster.healthy(stage)


def test_router_finds_every_replica_through_the_registry(cluster, cluster_router):
    for stage in ("decoder", "encoder", "llm"):
        cluster.wait_for(lambda stage=stage: _healthy(cluster, stage) == 2)
    result = collect(cluster_router, request(image(make_image(width=56, height=56)), text("hi"), num_tokens=4))
    assert result.final.completion_tokens == 4


def test_a_client_that_goes_away_frees_its_kv_blocks_in_the_llm(cluster, cluster_router):
    llms = [cluster.replicas[f"llm-{i}"] for i in range(2)]
    for i in range(4):
        stream = cluster_router.Generate(request(text(f"a long answer {i}"), num_tokens=2000), timeout=120)
        next(stream), next(stream)  # streaming has begun
        assert sum(cluster.metric("mmserve_llm_running_sequences", port=c.metrics_port) for c in llms) >= 1
        stream.cancel()
    names = ("mmserve_llm_running_sequences", "mmserve_llm_waiting_sequences", "mmserve_llm_kv_blocks_used")
    for llm in llms:
        occupancy = lambda llm=llm: [cluster.metric(n, port=llm.metrics_port) for n in names]  # noqa: E731
        cluster.wait_for(lambda: not any(occupancy()), describe=lambda: f"{llm.name}: {dict(zip(names, occupancy()))}")


def _one(router, i: int) -> str:
    """One request to its end: "OK", or the status code name it failed with."""
    parts = [image(make_image(width=56, height=56, seed=i)), text(f"request {i}")] if i % 2 else [text(f"q {i}")]
    try:
        collect(router, request(*parts, num_tokens=24), timeout=60)
        return "OK"
    except grpc.RpcError as err:
        return err.code().name


def test_kill_9_of_a_replica_per_stage_under_load_loses_nothing(cluster, cluster_router):
    reference = collect(cluster_router, request(text("after the storm"), num_tokens=8)).token_ids
    victims = [cluster.replicas[name] for name in ("encoder-0", "decoder-0", "llm-0")]
    num_requests = 30
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_one, cluster_router, i) for i in range(num_requests)]
        for victim in victims:
            time.sleep(0.3)
            victim.process.send_signal(signal.SIGKILL)
        outcomes = [f.result(timeout=120) for f in futures]  # none hangs
    accepted = len(outcomes)
    completed, failed = outcomes.count("OK"), [o for o in outcomes if o != "OK"]
    print(f"accepted={accepted} completed={completed} failed={len(failed)} ({sorted(set(failed))})")
    assert accepted == completed + len(failed)  # every request ended with a status
    assert set(failed) <= {"UNAVAILABLE"}  # those that had started streaming; the rest were retried
    assert completed >= num_requests // 2
    for stage in ("decoder", "encoder", "llm"):
        cluster.wait_for(lambda stage=stage: _healthy(cluster, stage) == 1)
    # The survivors serve everything, with the same answer as before.
    assert collect(cluster_router, request(text("after the storm"), num_tokens=8)).token_ids == reference

    # Replacements register themselves and are used as soon as they are healthy; the dead decoder's
    # shared-memory segments are reclaimed by the new one.
    dead_prefixes = [shm.owner_prefix(v.process.pid) for v in victims]
    for victim in victims:
        victim.process.wait()
    stage_of = {"encoder-0": "encoder", "decoder-0": "decoder", "llm-0": "llm"}
    replacements = [replica(stage_of[name], f"{name}-new", cluster.tiny_model, cluster.redis_server)
                    for name in stage_of]
    cluster.start(replacements)
    for stage in ("decoder", "encoder", "llm"):
        cluster.wait_for(lambda stage=stage: _healthy(cluster, stage) == 2)
    outcomes = [_one(cluster_router, i) for i in range(6)]
    assert outcomes == ["OK"] * 6
    leftovers = [s for s in shm.list_segments() if any(s.startswith(p) for p in dead_prefixes)]
    assert leftovers == []


def test_refused_when_the_ttft_target_cannot_be_met(cluster, cluster_router):
    # The router has decoded, encoded and prefilled images by now: it knows they take milliseconds.
    req = request(image(make_image(width=448, height=448, seed=99)), text("hurry"), num_tokens=4)
    req.slo.ttft_ms = 1
    with pytest.raises(grpc.RpcError) as caught:
        collect(cluster_router, req)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "time to first token" in caught.value.details()
    hint = dict(caught.value.trailing_metadata())["retry-after-ms"]
    assert int(hint) >= 50
    assert cluster.metric("mmserve_router_refused_total", cls="image") >= 1
