"""Fixtures the unit tests share."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from mmserve import tls
from mmserve.transport import TensorStore, shm


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A development CA with server and client certificates, in `mmserve certs`' layout (read, never written)."""
    return tls.make_dev_certs(tmp_path_factory.mktemp("tls"))


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(clock):
    """A store that puts every tensor of 1 KiB or more in shared memory; each segment is gone when it closes."""
    s = TensorStore("shm", inline_limit_bytes=1024, lease_s=10.0, clock=clock)
    yield s
    s.close()
    assert shm.list_segments(s.prefix) == []


@pytest.fixture
def served(clock):
    """A store that serves remote pulls (its callers on other hosts get remote refs)."""
    s = TensorStore("auto", inline_limit_bytes=1024, lease_s=10.0, clock=clock)
    s.address = "producer.example:50051"  # as transport.serve() sets it
    yield s
    s.close()


@pytest.fixture
def health_server():
    """A bare gRPC server with the stock health servicer on a free loopback port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)
