"""Replicas found through the Redis registry; kill -9 of replicas under load; nothing is silently lost."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import signal
import time
import urllib.request

import grpc
import pytest

from mmserve import rpc
from mmserve.launcher import Child, Stack, free_port
from mmserve.media.samples import make_image
from mmserve.transport import shm
from mmserve.v1 import api_pb2_grpc
from services.decoder.config import DecoderConfig
from services.encoder.config import EncoderConfig
from services.llm.config import LlmConfig
from services.router.config import RouterConfig
from tests.integration.helpers import collect, image, request, text

pytestmark = pytest.mark.slow


def _replica(stage: str, name: str, tiny_model, redis_server) -> Child:
    port, metrics_port = free_port(), free_port()
    common = dict(port=port, metrics_port=metrics_port, registry_url=redis_server.url, log_level="WARNING")
    config = {"decoder": lambda: DecoderConfig(**common),
              "encoder": lambda: EncoderConfig(model=str(tiny_model), redis_url=redis_server.url, **common),
              "llm": lambda: LlmConfig(model=str(tiny_model), **common)}[stage]()
    return Child(name, [*_python(stage), *config.to_argv()], f"127.0.0.1:{port}", metrics_port)


def _python(stage: str) -> list[str]:
    import sys

    return [sys.executable, "-m", f"services.{stage}"]


class Cluster:
    """Two replicas of each stage that register themselves, and a router that knows only the registry."""

    def __init__(self, tiny_model, redis_server):
        self.tiny_model, self.redis_server = tiny_model, redis_server
        self.replicas = {f"{stage}-{i}": _replica(stage, f"{stage}-{i}", tiny_model, redis_server)
                         for stage in ("decoder", "encoder", "llm") for i in range(2)}
        port, self.metrics_port = free_port(), free_port()
        config = RouterConfig(port=port, metrics_port=self.metrics_port, model=str(tiny_model),
                              redis_url=redis_server.url, registry_url=redis_server.url, registry_refresh_s=0.2,
                              log_level="WARNING", slo_ttft_ms_text=600_000, slo_ttft_ms_image=600_000,
                              slo_tpot_ms=600_000)  # faults are the subject here, not admission
        self.router = Child("router", [*_python("router"), *config.to_argv()], f"127.0.0.1:{port}")
        self.stacks: list[Stack] = []

    def start(self, children: list[Child]) -> None:
        stack = Stack(children, grace_s=5)
        stack.start()
        self.stacks.append(stack)
        asyncio.run(stack.wait_healthy(180))

    def stop(self) -> None:
        for stack in reversed(self.stacks):
            stack.stop()

    def metric(self, name: str, port: int = 0, **labels) -> float:
        """A sample of the router's metrics (or those of the service with metrics on port)."""
        url = f"http://127.0.0.1:{port or self.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
        match = re.search(rf"^{name}{{{selector}}} (\S+)$" if selector else rf"^{name} (\S+)$", body, re.M)
        return float(match.group(1)) if match else 0.0

    def wait_for(self, predicate, timeout_s: float = 30.0, describe=lambda: "") -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not reached in {timeout_s} s {describe()}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(tiny_model, redis_server):
    # A replica has been seen to abort (SIGABRT, cause not found yet) while starting in a busy suite:
    # one fresh cluster is then tried, so that the start-up flake does not hide what these tests check.
    for attempt in range(2):
        running = Cluster(tiny_model, redis_server)
        try:
            running.start(list(running.replicas.values()))
            running.start([running.router])
            break
        except RuntimeError:
            running.stop()
            if attempt:
                raise
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def cluster_router(cluster):
    channel = grpc.insecure_channel(cluster.router.address, options=rpc.message_options(64 * 1024 * 1024))
    yield api_pb2_grpc.RouterStub(channel)
    channel.close()


def _healthy(cluster: Cluster, stage: str) -> float:
    return cluster.metric("mmserve_router_healthy_replicas", stage=stage)


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
    replacements = [_replica(stage_of[name], f"{name}-new", cluster.tiny_model, cluster.redis_server)
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
