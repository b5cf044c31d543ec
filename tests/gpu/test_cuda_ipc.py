"""CUDA IPC between two real processes: a CUDA tensor handed to a caller that sees its GPU is opened there, its
lease ends, and a consumer that does not see the GPU pulls the bytes instead (skipped without a GPU)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from mmserve import transport
from tests.integration.test_transport_leaks import Producer

pytestmark = pytest.mark.gpu
MB = 1024 * 1024


@pytest.fixture
def gpu_producer():
    p = Producer(lease_s=60.0, policy="auto", device="cuda")
    yield p
    p.stop()


def test_cuda_tensor_is_opened_on_the_same_gpu_and_its_lease_ends(gpu_producer):
    ref = gpu_producer.produce(4 * MB, seed=7, metadata=transport.caller_metadata())
    assert ref.WhichOneof("location") == "cuda_ipc"
    tensor = asyncio.run(transport.resolve(ref))
    assert tensor.is_cuda and tensor.shape == (4 * MB,)
    assert tensor[:5].tolist() == [0, 1, 2, 3, 7] and int(tensor[-1]) == 7
    stats = gpu_producer.wait_idle()
    assert stats["idle"] and stats["live_leases"] == 0, stats


def test_a_consumer_that_does_not_see_the_gpu_pulls_instead(gpu_producer):
    ref = gpu_producer.produce(4 * MB, seed=9, metadata=transport.caller_metadata())
    assert ref.WhichOneof("location") == "cuda_ipc"
    ref.cuda_ipc.device_uuid = "GPU-00000000-0000-0000-0000-000000000000"  # as seen from another host
    tensor = asyncio.run(transport.resolve(ref))
    assert not tensor.is_cuda and tensor[:5].tolist() == [0, 1, 2, 3, 9]
    assert gpu_producer.wait_idle()["live_leases"] == 0


def test_without_our_gpus_in_the_metadata_the_tensor_leaves_the_gpu(gpu_producer):
    ref = gpu_producer.produce(4 * MB, metadata=(("mmserve-shm-domain", "another-host:1"),))
    assert ref.WhichOneof("location") == "remote"
    assert torch.equal(asyncio.run(transport.resolve(ref))[:4], torch.arange(4, dtype=torch.uint8))
