"""kill -STOP of an llm and a decoder replica under load: noticed by keepalive pings, work goes elsewhere, none hangs."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import grpc
import pytest

from mmserve.media.samples import make_image
from tests.integration.cluster import started_cluster
from tests.integration.helpers import collect, image, request, text

pytestmark = pytest.mark.slow

_DEADLINE_S = 60.0
_MARGIN_S = 15.0  # a status is due by the deadline; this only absorbs a busy machine's scheduling


@pytest.fixture(scope="module")
def cluster(tiny_model, redis_server):
    # Static addresses, no registry: a stopped replica also stops heartbeating, and leaving the registry
    # would hide whether the router itself noticed the stall.
    # The SLO policy (the default), so the cost models must also survive observations taken across a stall.
    running = started_cluster(tiny_model, redis_server, registry=False,
                              counts={"decoder": 2, "encoder": 1, "llm": 2})
    try:
        yield running
    finally:
        for child in running.replicas.values():  # never leave a stopped process behind
            if child.process and child.process.poll() is None:
                child.process.send_signal(signal.SIGCONT)
        running.stop()


def _one(router, i: int, num_tokens: int = 24) -> tuple[str, float]:
    """One request to its end: ("OK" or the status name, seconds it ended before its deadline)."""
    parts = [image(make_image(width=56, height=56, seed=i)), text(f"stalled {i}")] if i % 2 else [text(f"s {i}")]
    start = time.monotonic()
    try:
        collect(router, request(*parts, num_tokens=num_tokens), timeout=_DEADLINE_S)
        outcome = "OK"
    except grpc.RpcError as err:
        outcome = err.code().name
    return outcome, start + _DEADLINE_S - time.monotonic()


def test_a_stalled_llm_and_decoder_are_noticed_and_avoided_until_they_resume(cluster):
    router, channel = cluster.stub()
    llm_0, decoder_0 = cluster.replicas["llm-0"], cluster.replicas["decoder-0"]
    for stage, n in (("decoder", 2), ("encoder", 1), ("llm", 2)):
        cluster.wait_for(lambda stage=stage, n=n: cluster.healthy(stage) == n)
    reference = collect(router, request(text("while one sleeps"), num_tokens=8)).token_ids
    running_on_llm_0 = lambda: cluster.metric("mmserve_llm_running_sequences", port=llm_0.metrics_port)  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        # In flight when the replicas stop: some of these are streaming from llm-0.
        in_flight = [pool.submit(_one, router, i, 400) for i in range(8)]
        cluster.wait_for(lambda: running_on_llm_0() >= 1, describe=lambda: "(nothing reached llm-0)")
        for victim in (llm_0, decoder_0):
            victim.process.send_signal(signal.SIGSTOP)
        # Sent after the stall, so none had started anywhere: each must be retried elsewhere and succeed.
        after = [pool.submit(_one, router, 100 + i) for i in range(8)]
        outcomes = [f.result(timeout=_DEADLINE_S + _MARGIN_S) for f in in_flight + after]  # none hangs
    print("in flight:", [o for o, _ in outcomes[:8]], "after the stall:", [o for o, _ in outcomes[8:]])
    accepted = len(outcomes)
    completed = sum(o == "OK" for o, _ in outcomes)
    failed = [o for o, _ in outcomes if o != "OK"]
    assert accepted == completed + len(failed)  # every request ended with a status
    assert set(failed) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}  # only those that were streaming from llm-0
    assert all(left > -_MARGIN_S for _, left in outcomes)  # nobody's status came (much) after its deadline
    assert [o for o, _ in outcomes[8:]] == ["OK"] * 8

    # Noticed without any call failing on them: keepalive pings go unanswered, the health stream ends.
    for stage in ("decoder", "llm"):
        cluster.wait_for(lambda stage=stage: cluster.healthy(stage) == 1)
    assert collect(router, request(text("while one sleeps"), num_tokens=8)).token_ids == reference

    for victim in (llm_0, decoder_0):
        victim.process.send_signal(signal.SIGCONT)
    for stage in ("decoder", "llm"):
        cluster.wait_for(lambda stage=stage: cluster.healthy(stage) == 2)
    # Used again: requests reach llm-0 (two random choices pick it soon).
    before = cluster.metric("mmserve_llm_generated_tokens_total", port=llm_0.metrics_port)
    sent = 0

    def llm_0_used() -> bool:
        nonlocal sent
        sent += 1
        assert _one(router, 200 + sent, 4)[0] == "OK"
        return cluster.metric("mmserve_llm_generated_tokens_total", port=llm_0.metrics_port) > before

    cluster.wait_for(llm_0_used, timeout_s=120, describe=lambda: f"after {sent} requests")
    channel.close()
