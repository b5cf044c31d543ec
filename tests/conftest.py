"""Shared fixtures: a tiny checkpoint, a real redis-server, and the four services as real processes."""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import subprocess
import time

import grpc
import pytest
import redis

from mmserve import rpc
from stack.launcher import Stack, StackSpec, plan, redis_server_argv
from stack.ports import free_port
from mmserve.v1 import api_pb2_grpc


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> pathlib.Path:
    """A tiny random-weight Qwen2.5-VL checkpoint in the Hugging Face layout."""
    from mmserve.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


class RedisServer:
    """A private redis-server process on a free loopback port."""

    def __init__(self, workdir: pathlib.Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server not installed (make test installs it)")
        self.process = subprocess.Popen(
            redis_server_argv(binary, "127.0.0.1", self.port, maxmemory="256mb", workdir=str(self.workdir)),
            stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def media_root(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def stack_http_port() -> int:
    """The port of the stack router's OpenAI-compatible HTTP API."""
    return free_port()


# The shared stack serves tests that are not about admission, on machines of unknown speed: targets
# no test request misses, so the SLO policy orders and places work but never refuses it.
RELAXED_SLOS = ("--slo-ttft-ms-video", "600000", "--slo-ttft-ms-image", "600000", "--slo-ttft-ms-text", "600000",
                "--slo-tpot-ms", "600000")


@pytest.fixture(scope="session")
def stack(tiny_model, redis_server, media_root, stack_http_port):
    """Decoder, encoder, llm and router as separate processes; yields the router address."""
    spec = StackSpec(model=str(tiny_model), port=free_port(), redis_url=redis_server.url,
                     media_root=str(media_root), log_level="WARNING", http_port=stack_http_port,
                     router_args=RELAXED_SLOS)
    planned = plan(spec)
    children, router = planned.children(), planned.router_address
    running = Stack(children)
    running.start()
    try:
        asyncio.run(running.wait_healthy(180))
        yield router
    finally:
        running.stop()


@pytest.fixture(scope="session")
def openai_base_url(stack, stack_http_port) -> str:
    """The stack's OpenAI-compatible API, for `openai.OpenAI(base_url=...)`."""
    return f"http://127.0.0.1:{stack_http_port}/v1"


@pytest.fixture(scope="session")
def router(stack):
    """A synchronous Router stub on the running stack."""
    channel = grpc.insecure_channel(stack, options=rpc.message_options(256 * 1024 * 1024))
    yield api_pb2_grpc.RouterStub(channel)
    channel.close()
