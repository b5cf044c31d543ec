"""Fixtures the unit tests share."""

from __future__ import annotations

import pytest

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
