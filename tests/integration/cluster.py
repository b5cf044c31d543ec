"""A cluster of stage replicas and a router as real processes, for the fault, stall, overload and lifecycle tests."""

from __future__ import annotations

import asyncio
import sys
import time

import grpc

from mmserve import rpc
from stack.launcher import Child, Stack
from stack.ports import free_port
from mmserve.v1 import api_pb2_grpc
from services.decoder.config import DecoderConfig
from services.encoder.config import EncoderConfig
from services.llm.config import LlmConfig
from services.router.config import RouterConfig
from tests.integration.helpers import metric

# Faults are the subject of these tests, not admission: targets no request misses on a slow machine.
RELAXED_SLOS = dict(slo_ttft_ms_video=600_000, slo_ttft_ms_image=600_000, slo_ttft_ms_text=600_000,
                    slo_tpot_ms=600_000)


def replica(stage: str, name: str, tiny_model, redis_server, registry: bool = True, **options) -> Child:
    """One stage replica with its own gRPC and metrics ports; it registers itself when registry is set."""
    port, metrics_port = free_port(), free_port()
    common = dict(port=port, metrics_port=metrics_port, log_level="WARNING", **options)
    if registry:
        common["registry_url"] = redis_server.url
    config = {"decoder": lambda: DecoderConfig(model=str(tiny_model), **common),
              "encoder": lambda: EncoderConfig(model=str(tiny_model), redis_url=redis_server.url, **common),
              "llm": lambda: LlmConfig(model=str(tiny_model), **common)}[stage]()
    return Child(name, [sys.executable, "-m", f"services.{stage}", *config.to_argv()], f"127.0.0.1:{port}",
                 metrics_port)


class Cluster:
    """Replicas of each stage (`<stage>-<i>`) and a router that finds them through the registry or by address.

    counts: replicas per stage; stage_options: extra config fields per stage; router_options: router fields.
    """

    def __init__(self, tiny_model, redis_server, *, counts: dict[str, int] | None = None, registry: bool = True,
                 stage_options: dict[str, dict] | None = None, router_options: dict | None = None):
        self.tiny_model, self.redis_server = tiny_model, redis_server
        counts = counts or {"decoder": 2, "encoder": 2, "llm": 2}
        stage_options = stage_options or {}
        self.replicas = {f"{stage}-{i}": replica(stage, f"{stage}-{i}", tiny_model, redis_server, registry,
                                                 **stage_options.get(stage, {}))
                         for stage, n in counts.items() for i in range(n)}
        port, self.metrics_port = free_port(), free_port()
        routing = dict(registry_url=redis_server.url, registry_refresh_s=0.2) if registry else {
            f"{stage}_addrs": ",".join(c.address for name, c in self.replicas.items() if name.startswith(stage))
            for stage in counts}
        config = RouterConfig(port=port, metrics_port=self.metrics_port, model=str(tiny_model),
                              redis_url=redis_server.url, log_level="WARNING",
                              **{**RELAXED_SLOS, **routing, **(router_options or {})})
        self.router = Child("router", [sys.executable, "-m", "services.router", *config.to_argv()],
                            f"127.0.0.1:{port}")
        self.stacks: list[Stack] = []

    def start(self, children: list[Child]) -> None:
        stack = Stack(children, grace_s=5)
        stack.start()
        self.stacks.append(stack)
        asyncio.run(stack.wait_healthy(180))

    def start_all(self) -> None:
        """Starts the replicas, then the router."""
        self.start(list(self.replicas.values()))
        self.start([self.router])

    def stop(self) -> None:
        for stack in reversed(self.stacks):
            stack.stop()

    def stub(self) -> tuple[api_pb2_grpc.RouterStub, grpc.Channel]:
        """A synchronous Router stub on the router and its channel (close it when done)."""
        channel = grpc.insecure_channel(self.router.address, options=rpc.message_options(64 * 1024 * 1024))
        return api_pb2_grpc.RouterStub(channel), channel

    def metric(self, name: str, port: int = 0, **labels) -> float:
        """A sample of the router's metrics (or those of the service with metrics on port)."""
        return metric(port or self.metrics_port, name, **labels)

    def healthy(self, stage: str) -> float:
        """Replicas of stage the router considers healthy."""
        return self.metric("mmserve_router_healthy_replicas", stage=stage)

    def wait_for(self, predicate, timeout_s: float = 30.0, describe=lambda: "") -> None:
        """A hang guard, not a threshold: waits until predicate() holds."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not reached in {timeout_s} s {describe()}")
            time.sleep(0.1)


def started_cluster(tiny_model, redis_server, **kwargs) -> Cluster:
    """A started Cluster (its replicas' SIGABRT at start-up was gRPC's fork handlers: see mmserve/__init__.py)."""
    running = Cluster(tiny_model, redis_server, **kwargs)
    try:
        running.start_all()
    except BaseException:
        running.stop()
        raise
    return running
