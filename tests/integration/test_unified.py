"""A unified replica (encoder and llm over one device arbiter) answers exactly as separate processes do."""

from __future__ import annotations

import concurrent.futures
import shlex
import sys
import time

import pytest
import redis

from mmserve.media.samples import make_image, make_video
from services.decoder.config import DecoderConfig
from services.encoder.config import EncoderConfig
from services.llm.config import LlmConfig
from services.router.config import RouterConfig
from stack.launcher import Child
from stack.ports import free_port
from tests.integration.helpers import collect, image, metric, request, router_stub, running, text, video
from tests.integration.reference import Reference
from tests.integration.test_parity import CASES, NUM_TOKENS

pytestmark = pytest.mark.slow


# Taking turns on the device, and (two threads each) a slice on one thread beside decode steps on the other.
ARBITERS = {"turns": [], "overlap": ["--overlap-threads", "1"]}


def unified_stack(tiny_model, redis_server, *, arbiter_flags: list[str], registry: bool) -> tuple[list[Child], dict]:
    """A decoder, one unified replica (its one metrics registry on ports["metrics"]) and a router (its own on
    ports["router_metrics"]) that knows no other encoder or llm: given the replica's addresses, or with registry
    finding every service in Redis. Returns the children and the ports."""
    model = str(tiny_model)
    ports = {name: free_port() for name in ("decoder", "encoder", "llm", "router", "metrics", "router_metrics")}
    common = dict(log_level="WARNING", **(dict(registry_url=redis_server.url) if registry else {}))
    encoder = EncoderConfig(port=ports["encoder"], model=model, redis_url=redis_server.url,
                            metrics_port=ports["metrics"], num_threads=2, **common)
    llm = LlmConfig(port=ports["llm"], model=model, num_threads=2, **common)
    routing = (dict(registry_refresh_s=0.2) if registry else
               dict(decoder_addrs=f"127.0.0.1:{ports['decoder']}",
                    unified_addrs=f"127.0.0.1:{ports['encoder']}/127.0.0.1:{ports['llm']}"))
    router = RouterConfig(port=ports["router"], metrics_port=ports["router_metrics"], model=model,
                          redis_url=redis_server.url,
                          # Targets no burst on 2 busy cores can miss: this is about answers, not admission.
                          slo_ttft_ms_video=600_000, slo_ttft_ms_image=600_000, slo_ttft_ms_text=600_000,
                          slo_tpot_ms=600_000, **routing, **common)
    children = [
        Child("decoder", [sys.executable, "-m", "services.decoder",
                          *DecoderConfig(port=ports["decoder"], **common).to_argv()], f"127.0.0.1:{ports['decoder']}"),
        Child("unified", [sys.executable, "-m", "stack.unified", *arbiter_flags,
                          "--encoder-args", shlex.join(encoder.to_argv()),
                          "--llm-args", shlex.join(llm.to_argv())], f"127.0.0.1:{ports['llm']}"),
        Child("router", [sys.executable, "-m", "services.router", *router.to_argv()], f"127.0.0.1:{ports['router']}"),
    ]
    return children, ports


@pytest.fixture(scope="module", params=list(ARBITERS))
def unified(request, tiny_model, redis_server):
    """The unified stack by address; yields (router, the replica's metrics port)."""
    children, ports = unified_stack(tiny_model, redis_server, arbiter_flags=ARBITERS[request.param], registry=False)
    with running(children), router_stub(f"127.0.0.1:{ports['router']}") as stub:
        yield stub, ports["metrics"]


@pytest.fixture(scope="module")
def reference(tiny_model):
    return Reference(tiny_model)


@pytest.fixture(scope="module")
def clip() -> bytes:
    return make_video(seconds=2.0, fps=30, width=112, height=84, seed=1)


@pytest.mark.parametrize("case", ["text", "image", "video"])
def test_unified_matches_the_separate_stages(unified, reference, clip, case):
    # test_parity proves separate encoder and llm processes give transformers' tokens: so must a unified replica.
    req = CASES[case](clip)
    result = collect(unified[0], req)
    assert result.token_ids == reference.generate(req, NUM_TOKENS)
    assert result.final.completion_tokens == NUM_TOKENS


def test_eight_in_flight_on_one_device_each_match(unified, reference, clip):
    router, metrics_port = unified
    requests = [request(text(f"Question number {i}: what is {i} plus {i}?"), num_tokens=NUM_TOKENS)
                for i in range(4)]
    requests += [request(image(make_image(width=56 + 28 * i, height=84, seed=10 + i)), text(f"Picture {i}?"),
                         num_tokens=NUM_TOKENS) for i in range(2)]
    requests += [request(video(clip), text(f"Scene {i}: what moves?"), num_tokens=NUM_TOKENS) for i in range(2)]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: collect(router, r), requests))
    for req, result in zip(requests, results):
        assert result.token_ids == reference.generate(req, NUM_TOKENS)
    # Both roles took turns on the device, through the arbiter.
    for role in ("encoder", "llm"):
        assert metric(metrics_port, "mmserve_unified_device_seconds_total", role=role) > 0


def test_a_unified_replica_registers_once_as_the_pair_the_router_serves_through(tiny_model, redis_server):
    """With --registry-url it registers as `unified` at `<encoder>/<llm>`, not as an encoder and an llm of their own;
    a router that knows no address but the registry's puts it in both pools and serves through it."""
    children, ports = unified_stack(tiny_model, redis_server, arbiter_flags=[], registry=True)
    with running(children), router_stub(f"127.0.0.1:{ports['router']}") as stub:
        def healthy(stage: str) -> float:
            return metric(ports["router_metrics"], "mmserve_router_healthy_replicas", stage=stage)

        deadline = time.monotonic() + 60  # a hang guard
        while not (healthy("encoder") == healthy("llm") == 1):
            assert time.monotonic() < deadline, "the router never took the pair into its pools"
            time.sleep(0.1)
        # The router knows no address but the registry's: the entries are there by now.
        ours = {f"127.0.0.1:{ports[stage]}" for stage in ("decoder", "encoder", "llm")}
        keys = sorted(k.decode() for k in redis.Redis.from_url(redis_server.url).keys("mmserve:replica:*")
                      if any(address in k.decode() for address in ours))
        assert keys == [f"mmserve:replica:decoder:127.0.0.1:{ports['decoder']}",
                        f"mmserve:replica:unified:127.0.0.1:{ports['encoder']}/127.0.0.1:{ports['llm']}"]
        result = collect(stub, request(image(make_image(width=56, height=56, seed=3)), text("what is it?"),
                                       num_tokens=4))
        assert result.final.completion_tokens == 4
