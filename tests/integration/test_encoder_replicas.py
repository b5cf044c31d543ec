"""One video's chunks spread over two encoder replicas; the answer still equals transformers'."""

from __future__ import annotations

import pytest

from stack.launcher import StackSpec, free_port, plan
from mmserve.media.samples import make_video
from tests.integration.helpers import collect, metric, request, running, text, video
from tests.integration.reference import Reference


@pytest.fixture(scope="module")
def two_encoder_stack(tiny_model, redis_server):
    spec = StackSpec(model=str(tiny_model), port=free_port(), redis_url=redis_server.url, log_level="WARNING",
                     num_encoders=2, metrics=True)
    planned = plan(spec)
    children, router = planned.children(), planned.router_address
    with running(children):
        yield router, [c for c in children if c.name.startswith("encoder")]


def _requests_served(encoder) -> float:
    return metric(encoder.metrics_port, "mmserve_encoder_requests_total")


def test_video_chunks_spread_over_two_encoders(two_encoder_stack, tiny_model):
    import grpc

    from mmserve import rpc
    from mmserve.v1 import api_pb2_grpc

    address, encoders = two_encoder_stack
    assert len(encoders) == 2
    # Many short GOPs so the decoder cuts the sampled frames into several chunks.
    clip = make_video(seconds=4.0, fps=30, width=112, height=84, gop=10, seed=31)
    req = request(video(clip, fps=4.0), text("What moves?"), num_tokens=16)
    with grpc.insecure_channel(address, options=rpc.message_options(256 * 1024 * 1024)) as channel:
        result = collect(api_pb2_grpc.RouterStub(channel), req)
    assert result.token_ids == Reference(tiny_model).generate(req, 16)
    served = [_requests_served(e) for e in encoders]
    assert all(n >= 1 for n in served), f"chunks per encoder: {served}"
