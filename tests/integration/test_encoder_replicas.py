"""One video's chunks spread over two encoder replicas; the answer still equals transformers'."""

from __future__ import annotations

import time

import pytest

from stack.launcher import StackSpec, plan
from stack.ports import free_port
from mmserve.media.samples import make_video
from tests.integration.helpers import collect, metric, request, running, text, video
from tests.integration.reference import Reference


@pytest.fixture(scope="module")
def two_encoder_stack(tiny_model, redis_server):
    # Windows of 4 sampled frames: the test clip's 16 make four encoder calls (the default 16 would make one).
    spec = StackSpec(model=str(tiny_model), port=free_port(), redis_url=redis_server.url, log_level="WARNING",
                     num_encoders=2, metrics=True, router_args=("--video-chunk-frames", "4"))
    planned = plan(spec)
    children, router = planned.children(), planned.router_address
    with running(children):
        # Each child reports healthy to us before the router's own health watch has seen it: until then the
        # router would send every chunk to the one encoder it knows.
        (router_child,) = [c for c in children if c.name == "router"]
        deadline = time.monotonic() + 60  # a hang guard
        while metric(router_child.metrics_port, "mmserve_router_healthy_replicas", stage="encoder") < 2:
            assert time.monotonic() < deadline, "the router never saw both encoders healthy"
            time.sleep(0.1)
        yield router, [c for c in children if c.name.startswith("encoder")]


def _requests_served(encoder) -> float:
    return metric(encoder.metrics_port, "mmserve_encoder_requests_total")


def test_video_chunks_spread_over_two_encoders(two_encoder_stack, tiny_model):
    import grpc

    from mmserve import rpc
    from mmserve.v1 import api_pb2_grpc

    address, encoders = two_encoder_stack
    assert len(encoders) == 2
    # Many short GOPs so the decoder cuts the sampled frames into several chunks too.
    clip = make_video(seconds=4.0, fps=30, width=112, height=84, gop=10, seed=31)
    req = request(video(clip, fps=4.0), text("What moves?"), num_tokens=16)
    before = [_requests_served(e) for e in encoders]  # the router's warm-up image, where it was sent
    with grpc.insecure_channel(address, options=rpc.message_options(256 * 1024 * 1024)) as channel:
        result = collect(api_pb2_grpc.RouterStub(channel), req)
    assert result.token_ids == Reference(tiny_model).generate(req, 16)
    served = [_requests_served(e) - n for e, n in zip(encoders, before)]
    assert all(n >= 1 for n in served), f"chunks per encoder: {served}"
