"""SIGTERM under load: NOT_SERVING at once, in-flight requests finish within the grace period, exit 0."""

from __future__ import annotations

import queue
import signal
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.cluster import started_cluster
from tests.integration.helpers import collect, request, text

pytestmark = pytest.mark.slow

_GRACE_S = 120.0  # long enough for the longest request here on a busy machine; the test never waits it out
_LONG = 1500  # tokens of the request in flight: still running while the test looks around


@pytest.fixture(scope="module")
def cluster(tiny_model, redis_server):
    running = started_cluster(tiny_model, redis_server, registry=False,
                              counts={"decoder": 1, "encoder": 1, "llm": 2},
                              stage_options={"llm": {"grace_s": _GRACE_S}}, router_options={"grace_s": _GRACE_S})
    try:
        yield running
    finally:
        running.stop()


class _Stream:
    """A long greedy request run in a thread."""

    def __init__(self, router, prompt: str):
        self.outcome: list = []
        self.thread = threading.Thread(target=self._run, args=(router, prompt), daemon=True)
        self.thread.start()

    def _run(self, router, prompt: str) -> None:
        try:
            self.outcome.append(collect(router, request(text(prompt), num_tokens=_LONG), timeout=600))
        except grpc.RpcError as err:
            self.outcome.append(err)

    def result(self):
        self.thread.join(timeout=600)
        assert self.outcome, "the request hung"
        return self.outcome[0]


class _Health:
    """The statuses a server's health Watch stream reports, in a thread."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        self.statuses: queue.Queue = queue.Queue()
        self.stream = health_pb2_grpc.HealthStub(self.channel).Watch(health_pb2.HealthCheckRequest(service=""))
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for reply in self.stream:
                self.statuses.put(reply.status)
        except grpc.RpcError:
            self.statuses.put(None)  # the server went away

    def next(self):
        return self.statuses.get(timeout=60)

    def close(self) -> None:
        """Ends the stream: a draining server waits for its open calls, this one included."""
        self.stream.cancel()
        self.channel.close()


def _prompt_tokens(cluster, child) -> float:
    return cluster.metric("mmserve_llm_prompt_tokens_total", port=child.metrics_port)


def test_sigterm_of_an_llm_replica_drains_it_and_the_router_stops_using_it(cluster):
    router, channel = cluster.stub()
    cluster.wait_for(lambda: cluster.healthy("llm") == 2)
    llms = [cluster.replicas["llm-0"], cluster.replicas["llm-1"]]
    running = lambda c: cluster.metric("mmserve_llm_running_sequences", port=c.metrics_port)  # noqa: E731
    # The router's warm-up prompt, one per llm, would pass for the long request below.
    cluster.wait_for(lambda: all(_prompt_tokens(cluster, c) > 0 and not running(c) for c in llms))
    reference = collect(router, request(text("meanwhile"), num_tokens=8)).token_ids
    long_request = _Stream(router, "a long answer, please")
    cluster.wait_for(lambda: any(running(c) for c in llms))
    serving, other = sorted(llms, key=running, reverse=True)
    health = _Health(serving.address)
    assert health.next() == health_pb2.HealthCheckResponse.SERVING

    serving.process.send_signal(signal.SIGTERM)
    assert health.next() == health_pb2.HealthCheckResponse.NOT_SERVING  # before anything else happens
    health.close()
    cluster.wait_for(lambda: cluster.healthy("llm") == 1)
    admitted = _prompt_tokens(cluster, serving)
    # New requests go to the other replica while the draining one still serves the long request.
    for _ in range(3):
        assert collect(router, request(text("meanwhile"), num_tokens=8)).token_ids == reference
    assert serving.process.poll() is None and running(serving) == 1, "the long request should still be running"
    assert _prompt_tokens(cluster, serving) == admitted

    result = long_request.result()
    assert not isinstance(result, Exception), f"the in-flight request failed: {result}"
    assert result.final.completion_tokens == _LONG and result.final.finish_reason == "length"
    assert serving.process.wait(timeout=60) == 0  # once its last call ended, not after the whole grace period
    channel.close()


def test_sigterm_of_the_router_finishes_its_in_flight_request(cluster):
    router, channel = cluster.stub()
    long_request = _Stream(router, "one more long answer")
    llm = next(c for name, c in cluster.replicas.items() if name.startswith("llm") and c.process.poll() is None)
    cluster.wait_for(lambda: cluster.metric("mmserve_llm_running_sequences", port=llm.metrics_port) >= 1)
    health = _Health(cluster.router.address)
    assert health.next() == health_pb2.HealthCheckResponse.SERVING
    cluster.router.process.send_signal(signal.SIGTERM)
    assert health.next() == health_pb2.HealthCheckResponse.NOT_SERVING
    health.close()
    result = long_request.result()
    assert not isinstance(result, Exception), f"the in-flight request failed: {result}"
    assert result.final.completion_tokens == _LONG
    assert cluster.router.process.wait(timeout=60) == 0  # before its grace period ran out
    channel.close()
