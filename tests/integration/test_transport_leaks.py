"""Shared-memory and remote-pull handoffs between real processes: cancellations, a killed consumer and a stopped
producer leak nothing (no segment in /dev/shm, no live lease, flat RSS), and a ref to a stopped producer reads
UNAVAILABLE."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import grpc
import psutil
import pytest
from google.protobuf import struct_pb2

from mmserve import transport
from mmserve.transport import shm
from mmserve.v1 import tensor_pb2
from tests.integration.transport_peer import SERVICE

MB = 1024 * 1024
PEER = [sys.executable, "-m", "tests.integration.transport_peer"]


class Producer:
    def __init__(self, lease_s: float = 0.5, policy: str = "shm", device: str = "cpu"):
        self.policy = policy
        self.process = subprocess.Popen([*PEER, "producer", "--lease-s", str(lease_s), "--transport", policy,
                                         "--device", device], stdout=subprocess.PIPE, text=True)
        self.address = f"127.0.0.1:{json.loads(self.process.stdout.readline())['port']}"
        self.prefix = shm.owner_prefix(self.process.pid)
        self.channel = grpc.insecure_channel(self.address)

    def produce(self, nbytes: int, seed: int = 0, metadata=()) -> tensor_pb2.TensorRef:
        call = self.channel.unary_unary(f"/{SERVICE}/Produce", tensor_pb2.TensorRef.SerializeToString,
                                        tensor_pb2.TensorRef.FromString)
        return call(tensor_pb2.TensorRef(shape=[nbytes, seed]), timeout=30, metadata=metadata)

    def wait_idle(self) -> dict:
        call = self.channel.unary_unary(f"/{SERVICE}/WaitIdle", struct_pb2.Struct.SerializeToString,
                                        struct_pb2.Struct.FromString)
        request = struct_pb2.Struct()
        request.update({"timeout_s": 30})
        return dict(call(request, timeout=60))

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def segments(self) -> list[str]:
        return shm.list_segments(self.prefix)

    def stop(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)


@pytest.fixture(params=["shm", "remote"])
def producer(request):
    p = Producer(policy=request.param)
    yield p
    p.stop()


@pytest.fixture
def shm_producer():
    p = Producer()
    yield p
    p.stop()


def consume(producer: Producer, num_handoffs: int, cancel_fraction: float = 0.1) -> dict:
    out = subprocess.run([*PEER, "consumer", "--address", producer.address, "--num-handoffs", str(num_handoffs),
                          "--cancel-fraction", str(cancel_fraction), "--transport", producer.policy], check=True,
                         capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.splitlines()[-1])


def test_thousand_handoffs_with_cancellations_and_a_killed_consumer_leak_nothing(producer):
    producer_rss_start = producer.rss()
    result = consume(producer, 1000, cancel_fraction=0.1)
    assert result["mapped"] + result["cancelled"] == 1000 and result["cancelled"] > 50
    # The consumer measures itself after its first 200 handoffs (warm) and at the end.
    assert result["rss_end"] - result["rss_warm"] < 50 * MB, result

    holder = subprocess.Popen([*PEER, "consumer", "--address", producer.address, "--hold", "8", "--transport",
                               producer.policy], stdout=subprocess.PIPE, text=True)
    held = json.loads(holder.stdout.readline())["holding"]
    assert len(held) == 8
    if producer.policy == "shm":
        assert all(os.path.exists(shm.SHM_DIR / name) for name in held)
    holder.kill()  # dies holding eight refs it never mapped
    holder.wait()
    if producer.policy == "remote":  # and one that dies in the middle of pulling 256 MB
        staller = subprocess.Popen([*PEER, "consumer", "--address", producer.address, "--stall", "--transport",
                                    "remote"], stdout=subprocess.PIPE, text=True)
        assert json.loads(staller.stdout.readline())["pulling"]
        staller.kill()
        staller.wait()

    stats = producer.wait_idle()  # returns once the unclaimed leases (held + cancelled) have expired
    assert stats["idle"] and stats["live_leases"] == 0, stats
    assert stats["expired"] >= 8
    assert producer.segments() == []
    assert producer.rss() - producer_rss_start < 50 * MB


def test_ref_to_a_stopped_producer_is_unavailable_and_nothing_is_left(shm_producer):
    producer = shm_producer
    refs = [producer.produce(256 * 1024, seed) for seed in range(3)]
    assert all(r.WhichOneof("location") == "shared_memory" for r in refs)
    assert transport.from_ref(refs[0])[:4].tolist() == [0, 1, 2, 3]
    assert len(producer.segments()) == 2
    producer.stop()  # graceful: unlinks what nobody claimed
    assert producer.segments() == []
    with pytest.raises(transport.TensorUnavailable, match="gone"):
        transport.from_ref(refs[1])


def test_orphans_of_a_killed_producer_are_reaped_by_the_next_store(shm_producer):
    producer = shm_producer
    ref = producer.produce(256 * 1024)
    producer.process.kill()  # no chance to clean up
    producer.process.wait()
    assert producer.segments() == [ref.shared_memory.name]
    store = transport.TensorStore("shm")  # any new store on the host runs the janitor
    store.close()
    assert producer.segments() == []


def test_remote_ref_to_a_killed_producer_is_unavailable_naming_it():
    producer = Producer(policy="remote")
    try:
        ref = producer.produce(256 * 1024)
        assert ref.WhichOneof("location") == "remote" and ref.remote.address == producer.address
        assert asyncio.run(transport.resolve(ref))[:4].tolist() == [0, 1, 2, 3]
        ref = producer.produce(256 * 1024, seed=1)
        producer.process.kill()  # before the pull
        producer.process.wait()
        with pytest.raises(transport.TensorUnavailable, match=f"producer {producer.address} unavailable"):
            asyncio.run(transport.resolve(ref, timeout_s=30))
    finally:
        producer.stop()
