"""A flood far beyond every bound (small ones, set by flags): each request ends OK or RESOURCE_EXHAUSTED, none hangs."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmserve import rpc
from mmserve.media.samples import make_image
from mmserve.v1 import decoder_pb2, decoder_pb2_grpc
from tests.integration.cluster import started_cluster
from tests.integration.helpers import collect, image, request, text
from tests.integration.reference import Reference

pytestmark = pytest.mark.slow

_ROUTER_RPCS = 12  # the router's max_concurrent_rpcs
_FLOOD = 3 * (_ROUTER_RPCS + 2 * 2 + 4)  # 3 × what the router, its stage waiters and the llm queue can hold


@pytest.fixture(scope="module")
def cluster(tiny_model, redis_server):
    running = started_cluster(
        tiny_model, redis_server, registry=False, counts={"decoder": 1, "encoder": 1, "llm": 1},
        stage_options={"llm": dict(max_num_seqs=2, max_queue=2), "encoder": dict(max_queue=2),
                       "decoder": dict(max_queue=2, num_workers=1)},
        # Prices are compared below: no warm-up profile teaching the cost models beside the tests, and no probe
        # admitting the 1 ms request a price is read from (on this tiny model a prediction may be within 4x of it).
        router_options=dict(max_concurrent_rpcs=_ROUTER_RPCS, decoder_max_in_flight=1, encoder_max_in_flight=1,
                            stage_max_waiting=2, warmup=False, admission_probe_after_s=0))
    try:
        yield running
    finally:
        running.stop()


def _one(router, i: int) -> tuple[str, str, str]:
    """("OK", "", "") or (status name, details, retry-after-ms) of one request run to its end."""
    parts = [image(make_image(width=56, height=56, seed=i)), text(f"flood {i}")] if i % 2 else [text(f"f {i}")]
    try:
        collect(router, request(*parts, num_tokens=32), timeout=300)
        return "OK", "", ""
    except grpc.RpcError as err:
        return err.code().name, err.details() or "", dict(err.trailing_metadata() or ()).get(rpc.RETRY_AFTER_HEADER, "")


def _greedy() -> object:
    return request(text("after the flood"), num_tokens=12)


def test_a_flood_beyond_every_queue_is_refused_cleanly_and_leaves_the_stack_serving(cluster, tiny_model):
    router, channel = cluster.stub()
    before = collect(router, _greedy()).token_ids
    with concurrent.futures.ThreadPoolExecutor(_FLOOD) as pool:
        outcomes = list(pool.map(lambda i: _one(router, i), range(_FLOOD), timeout=600))  # none hangs
    counts = collections.Counter(code for code, _, _ in outcomes)
    refusals = collections.Counter(details for code, details, _ in outcomes if code == "RESOURCE_EXHAUSTED")
    print(f"{_FLOOD} requests: {dict(counts)}; refusals: {dict(refusals)}")
    assert sum(counts.values()) == _FLOOD  # none lost
    assert set(counts) <= {"OK", "RESOURCE_EXHAUSTED"}, [o for o in outcomes if o[0] not in ("OK", "RESOURCE_EXHAUSTED")]
    assert counts["OK"] >= 1 and counts["RESOURCE_EXHAUSTED"] >= 1
    for details in refusals:  # each names what is full
        assert any(word in details.lower() for word in ("capacity", "queue", "limit")), details
    # and tells when to come back, the router's own limit of calls in flight included (gRPC's said neither)
    assert all(after and float(after) > 0 for code, _, after in outcomes if code == "RESOURCE_EXHAUSTED"), \
        [o for o in outcomes if o[0] == "RESOURCE_EXHAUSTED" and not o[2]]

    # Every service is still SERVING, and a normal request gets the reference greedy answer.
    for child in [cluster.router, *cluster.replicas.values()]:
        with grpc.insecure_channel(child.address) as health_channel:
            reply = health_pb2_grpc.HealthStub(health_channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, child.name
    after = collect(router, _greedy()).token_ids
    assert after == before == Reference(tiny_model).generate(_greedy(), 12)
    channel.close()


def test_the_decoder_queue_is_bounded_for_any_caller(cluster):
    # The router sends one call at a time to this decoder; another client (a second router) need not.
    decoder = cluster.replicas["decoder-0"]
    data = make_image(width=640, height=480, seed=7)
    with grpc.insecure_channel(decoder.address, options=rpc.message_options(64 * 1024 * 1024)) as channel:
        stub = decoder_pb2_grpc.DecoderStub(channel)

        def decode(i: int) -> str:
            req = decoder_pb2.DecodeRequest(request_id=f"flood-{i}", kind=decoder_pb2.MEDIA_KIND_IMAGE, data=data,
                                            min_pixels=3136, max_pixels=640 * 480)
            try:
                list(stub.Decode(req, timeout=300))
                return "OK"
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                assert "decoder queue" in err.details(), err.details()
                return err.code().name

        # The module's earlier flood may still be draining out of this small queue: start once one call fits.
        for attempt in range(300):
            if decode(100 + attempt) == "OK":
                break
            time.sleep(0.1)
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            outcomes = collections.Counter(pool.map(decode, range(16), timeout=600))
    print(dict(outcomes))
    assert outcomes["OK"] >= 1 and outcomes["RESOURCE_EXHAUSTED"] >= 1


def _price(cluster, router) -> tuple[str, dict[str, float]]:
    """How admission prices a text request as things stand (the refusal of one with a 1 ms target states it), and
    the work its book holds outstanding per stage (a job due later than 1 ms from now is not in that price)."""
    priced = request(text("what would this cost?"), num_tokens=8)
    priced.slo.ttft_ms = 1  # 1 ms: below any prediction
    with pytest.raises(grpc.RpcError) as refused:
        collect(router, priced)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    book = {stage: cluster.metric("mmserve_router_backlog_ms", stage=stage) for stage in ("decoder", "encoder", "llm")}
    return refused.value.details(), book


def test_a_cancelled_burst_leaves_the_next_request_priced_as_before(cluster):
    router, channel = cluster.stub()
    collect(router, _greedy())  # the models have seen a request of this kind
    before = _price(cluster, router)
    for wave in range(15):  # 60 requests whose clients go away, at once or after their first token
        calls = [router.Generate(request(text(f"cancelled {wave} {i}"), num_tokens=64), timeout=120)
                 for i in range(4)]
        for i, call in enumerate(calls):
            if i % 2:
                with contextlib.suppress(grpc.RpcError):  # refused when the small queues are full
                    next(call)
            call.cancel()
    # The router ends a cancelled call's bookkeeping once it sees the cancellation, a moment after the client.
    price = _price(cluster, router)
    for _ in range(50):
        if price == before:
            break
        time.sleep(0.2)
        price = _price(cluster, router)
    assert price == before
    channel.close()
