"""EPD role switching: a flex replica moves to the encoder pool under video load and back under text load."""

from __future__ import annotations

import asyncio
import concurrent.futures
import shlex
import sys
import time

import grpc
import pytest

from mmserve import rpc
from stack.launcher import Child, Stack
from stack.ports import free_port
from mmserve.media.samples import make_video
from mmserve.v1 import api_pb2_grpc
from services.decoder.config import DecoderConfig
from services.encoder.config import EncoderConfig
from services.llm.config import LlmConfig
from services.router.config import RouterConfig
from tests.integration.helpers import collect, metric, request, text, video

pytestmark = pytest.mark.slow


class FlexStack:
    """A decoder, one encoder, one llm, one flex replica (encoder + llm in one process) and the router."""

    def __init__(self, tiny_model, redis_server):
        model, redis_url = str(tiny_model), redis_server.url
        common = dict(log_level="WARNING")
        ports = {name: free_port() for name in ("decoder", "encoder", "llm", "flex-encoder", "flex-llm", "router")}
        self.flex_metrics, self.router_metrics = free_port(), free_port()
        configs = {
            "decoder": DecoderConfig(port=ports["decoder"], model=model, **common),
            "encoder": EncoderConfig(port=ports["encoder"], model=model, redis_url=redis_url, **common),
            "llm": LlmConfig(port=ports["llm"], model=model, **common),
        }
        children = [Child(name, [sys.executable, "-m", f"services.{name}", *config.to_argv()],
                          f"127.0.0.1:{config.port}") for name, config in configs.items()]
        flex_encoder = EncoderConfig(port=ports["flex-encoder"], model=model, redis_url=redis_url,
                                     metrics_port=self.flex_metrics, **common)
        flex_llm = LlmConfig(port=ports["flex-llm"], model=model, **common)
        children.append(Child("flex", [sys.executable, "-m", "stack.flex",
                                       "--encoder-args", shlex.join(flex_encoder.to_argv()),
                                       "--llm-args", shlex.join(flex_llm.to_argv())], f"127.0.0.1:{ports['flex-llm']}"))
        self.flex_name = f"127.0.0.1:{ports['flex-encoder']}/127.0.0.1:{ports['flex-llm']}"
        router = RouterConfig(
            port=ports["router"], metrics_port=self.router_metrics, model=model, redis_url=redis_url,
            decoder_addrs=f"127.0.0.1:{ports['decoder']}", encoder_addrs=f"127.0.0.1:{ports['encoder']}",
            llm_addrs=f"127.0.0.1:{ports['llm']}", flex_addrs=self.flex_name,
            # Moves at the first sustained imbalance, so a short burst is enough; targets no burst on 2 busy
            # cores can miss, so admission admits it all.
            role_switch_ratio=2.0, role_switch_min_backlog_ms=1.0, role_switch_sustain_s=0.5,
            role_switch_dwell_s=1.0, slo_ttft_ms_video=600_000, slo_ttft_ms_text=600_000, slo_tpot_ms=600_000,
            **common)
        children.append(Child("router", [sys.executable, "-m", "services.router", *router.to_argv()],
                              f"127.0.0.1:{ports['router']}"))
        self.stack = Stack(children, grace_s=5)
        self.address = f"127.0.0.1:{ports['router']}"

    def role(self) -> str:
        return next(stage for stage in ("encoder", "llm")
                    if metric(self.router_metrics, "mmserve_router_flex_role", replica=self.flex_name,
                               stage=stage) == 1)


@pytest.fixture(scope="module")
def flex_stack(tiny_model, redis_server):
    running = FlexStack(tiny_model, redis_server)
    running.stack.start()
    try:
        asyncio.run(running.stack.wait_healthy(180))
        yield running
    finally:
        running.stack.stop()


def _load_until(stack: FlexStack, make_request, role: str, timeout_s: float = 180.0) -> list:
    """Sends waves of 12 concurrent requests until the flex replica serves in `role`; every request must succeed."""
    results = []
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(stack.address, options=rpc.message_options(64 << 20)) as channel, \
            concurrent.futures.ThreadPoolExecutor(12) as pool:
        router = api_pb2_grpc.RouterStub(channel)
        wave = 0
        while stack.role() != role:
            assert time.monotonic() < deadline, f"the flex replica never moved to the {role} pool"
            results += list(pool.map(lambda i: collect(router, make_request(wave * 12 + i)), range(12)))
            wave += 1
    return results


def test_flex_replica_moves_to_the_stage_that_backs_up_and_back(flex_stack):
    assert flex_stack.role() == "llm"  # where flex replicas start
    served_before = metric(flex_stack.flex_metrics, "mmserve_encoder_requests_total")

    # Videos, each new (no cache hit), few output tokens: the encoder stage backs up.
    def video_request(i):
        clip = make_video(seconds=2.0, fps=8, width=224, height=168, seed=1000 + i)
        return request(video(clip), text("What happens?"), num_tokens=2)
    results = _load_until(flex_stack, video_request, "encoder")
    assert all(r.final.finish_reason for r in results)
    # Once moved, the flex process's vision tower takes the router's encode calls.
    with grpc.insecure_channel(flex_stack.address, options=rpc.message_options(64 << 20)) as channel:
        router = api_pb2_grpc.RouterStub(channel)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: collect(router, video_request(5000 + i)), range(8)))
    assert metric(flex_stack.flex_metrics, "mmserve_encoder_requests_total") > served_before

    # Long text prompts only: the llm stage backs up and the flex replica goes back.
    results = _load_until(flex_stack, lambda i: request(text(f"Story {i}: " + "once upon a time " * 60),
                                                        num_tokens=4), "llm")
    assert all(r.final.finish_reason for r in results)
    assert metric(flex_stack.router_metrics, "mmserve_router_role_switches_total", stage="llm") >= 1
