"""TensorRef packing: exact round trips for every dtype and shape, clear errors for malformed refs."""

from __future__ import annotations

import pytest
import torch

from mmserve.transport import TensorRefError, from_ref, to_ref
from mmserve.v1 import tensor_pb2


def sample(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**40)), min(info.max, 2**40), shape, generator=g, dtype=dtype)


def round_trip(tensor: torch.Tensor) -> torch.Tensor:
    back = from_ref(to_ref(tensor))
    assert back.dtype == tensor.dtype
    assert back.shape == tensor.shape
    assert torch.equal(back, tensor)
    return back


ALL_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
              torch.float32, torch.float64, torch.bool]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_round_trip(dtype):
    round_trip(sample(dtype))


def test_ref_fields():
    ref = to_ref(torch.zeros(2, 3, dtype=torch.bfloat16))
    assert ref.dtype == "bfloat16"
    assert list(ref.shape) == [2, 3]
    assert ref.WhichOneof("location") == "inline_data"
    assert len(ref.inline_data) == 2 * 3 * 2


def test_bytes_are_little_endian_c_order():
    ref = to_ref(torch.tensor([[1, 2], [3, 256]], dtype=torch.int16))
    assert ref.inline_data == b"\x01\x00\x02\x00\x03\x00\x00\x01"


def test_float_special_values_survive():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45], dtype=torch.float32)
    back = from_ref(to_ref(x))
    assert back.view(torch.int32).tolist() == x.view(torch.int32).tolist()


@pytest.mark.parametrize("shape", [(0,), (0, 64), (4, 0), (2, 0, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8], ids=str)
def test_empty_tensors(shape, dtype):
    ref = to_ref(torch.empty(shape, dtype=dtype))
    assert ref.inline_data == b""
    assert from_ref(ref).shape == shape


def test_zero_dim_scalar():
    round_trip(torch.tensor(3.25, dtype=torch.float64))


@pytest.mark.parametrize("make", [
    lambda x: x.t(),
    lambda x: x[:, ::2],
    lambda x: x[1:, 1:],
    lambda x: x.unsqueeze(0).expand(3, -1, -1),
], ids=["transposed", "strided", "offset", "expanded"])
def test_non_contiguous_input(make):
    view = make(sample(torch.float32, (4, 6)))
    assert not view.is_contiguous() or view.storage_offset() != 0
    round_trip(view)


def test_result_is_writable_and_independent_of_the_ref():
    ref = to_ref(torch.ones(4))
    back = from_ref(ref)
    back += 1
    assert torch.equal(from_ref(ref), torch.ones(4))


def test_requires_grad_input_is_detached():
    x = torch.randn(3, requires_grad=True)
    assert torch.equal(from_ref(to_ref(x)), x.detach())


def test_unsupported_dtype_on_pack():
    with pytest.raises(TensorRefError, match="dtype"):
        to_ref(torch.zeros(2, dtype=torch.complex64))


def ref(dtype="float32", shape=(2, 3), data: bytes | None = None) -> tensor_pb2.TensorRef:
    if data is None:
        data = bytes(4 * 6)
    return tensor_pb2.TensorRef(dtype=dtype, shape=list(shape), inline_data=data)


def test_valid_handmade_ref():
    assert torch.equal(from_ref(ref()), torch.zeros(2, 3))


@pytest.mark.parametrize("data", [b"", bytes(4 * 6 - 1), bytes(4 * 6 + 1), bytes(4 * 6 * 2)])
def test_wrong_byte_count(data):
    with pytest.raises(TensorRefError, match="bytes do not fit"):
        from_ref(ref(data=data))


def test_bytes_for_an_empty_shape():
    with pytest.raises(TensorRefError, match="bytes do not fit"):
        from_ref(ref(shape=(0, 3), data=b"\x00" * 4))


@pytest.mark.parametrize("dtype", ["", "float8", "complex64", "torch.float32", "Float32", "int"])
def test_unknown_dtype(dtype):
    with pytest.raises(TensorRefError, match="unknown dtype"):
        from_ref(ref(dtype=dtype))


@pytest.mark.parametrize("shape", [(-1, 6), (2, -3), (-2, -3)])
def test_negative_dims(shape):
    with pytest.raises(TensorRefError, match="negative dimension"):
        from_ref(ref(shape=shape))


def test_missing_location():
    with pytest.raises(TensorRefError, match="not supported"):
        from_ref(tensor_pb2.TensorRef(dtype="float32", shape=[2]))


def test_errors_are_value_errors():
    assert issubclass(TensorRefError, ValueError)


# --- remote pull: chunk framing, and resolve against a producer's TensorStore service on loopback -------------

@pytest.mark.parametrize("n", [0, 1, 127, 128, 16383, 16384, 300_000])
def test_chunk_framing_is_the_protobuf_encoding(n):
    from mmserve.transport import remote

    data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    wire = remote.encode_chunk(memoryview(data))
    assert wire == tensor_pb2.TensorChunk(data=data).SerializeToString()
    assert bytes(remote.decode_chunk(wire)) == data


def test_a_remote_ref_needs_the_async_path():
    ref = tensor_pb2.TensorRef(dtype="uint8", shape=[4], remote=tensor_pb2.RemoteRef(address="a:1", handle_id="h",
                                                                                      nbytes=4))
    with pytest.raises(TensorRefError, match="resolve"):
        from_ref(ref)


@pytest.fixture
async def producer():
    """A TensorStore forced to remote refs, served by a real gRPC server on a free loopback port."""
    import grpc

    from mmserve import transport

    store = transport.TensorStore("remote", inline_limit_bytes=64, lease_s=60.0)
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    transport.serve(store, server, f"127.0.0.1:{port}")
    await server.start()
    yield store
    await server.stop(None)
    store.close()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
async def test_remote_round_trip(producer, dtype):
    from mmserve import transport

    x = sample(dtype, (3000, 181))  # a few chunks, the last one partial
    ref = producer.to_ref(x)
    assert ref.WhichOneof("location") == "remote"
    back = await transport.resolve(ref)
    assert back.dtype == x.dtype and torch.equal(back, x)
    assert producer.num_live_leases() == 0


async def test_remote_ref_is_pulled_once(producer):
    from mmserve import transport

    ref = producer.to_ref(sample(torch.float32, (64, 64)))
    await transport.resolve(ref)
    with pytest.raises(transport.TensorUnavailable, match="gone"):
        await transport.resolve(ref)


async def test_concat_of_remote_and_inline_parts_fills_one_tensor(producer):
    from mmserve import transport

    parts = [sample(torch.bfloat16, (n, 40)) for n in (700, 3, 1200)]
    ref = transport.concat([producer.to_ref(parts[0]), transport.to_inline(parts[1]), producer.to_ref(parts[2])])
    assert len(transport.leased_parts(ref)) == 2
    assert torch.equal(await transport.resolve(ref), torch.cat(parts))
    assert producer.num_live_leases() == 0


async def test_a_stopped_producer_is_unavailable_and_named():
    import grpc

    from mmserve import transport

    store = transport.TensorStore("remote", inline_limit_bytes=0)
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    transport.serve(store, server, f"127.0.0.1:{port}")
    await server.start()
    ref = store.to_ref(torch.ones(1000))
    await server.stop(None)
    store.close()
    with pytest.raises(transport.TensorUnavailable, match=f"producer 127.0.0.1:{port} unavailable"):
        await transport.resolve(ref, timeout_s=30)


async def test_a_remote_ref_with_a_lying_size_is_invalid(producer):
    from mmserve import transport

    ref = producer.to_ref(torch.ones(1000))
    ref.remote.nbytes += 4
    with pytest.raises(TensorRefError, match="does not fit"):
        await transport.resolve(ref)


async def test_a_cancelled_pull_ends_its_lease(producer):
    import asyncio

    from mmserve.transport import remote

    ref = producer.to_ref(torch.ones(64 * 1024 * 1024, dtype=torch.uint8))  # 64 chunks
    pull = remote._channel(producer.address).unary_stream(
        f"/{remote.SERVICE}/Pull", tensor_pb2.PullRequest.SerializeToString, remote.decode_chunk)
    call = pull(tensor_pb2.PullRequest(handle_id=ref.remote.handle_id))
    assert len(await call.read()) == remote.CHUNK_BYTES  # the producer is streaming
    call.cancel()
    assert await asyncio.to_thread(producer.wait_idle, 30)


async def test_a_failed_part_cancels_and_releases_the_others(producer):
    from mmserve import transport

    good = producer.to_ref(torch.ones(100_000))
    gone = tensor_pb2.TensorRef(dtype="float32", shape=[100], remote=tensor_pb2.RemoteRef(
        address=producer.address, handle_id="0" * 32, nbytes=400))
    with pytest.raises(transport.TensorUnavailable, match="gone"):
        await transport.resolve_all([good, gone])
    assert producer.num_live_leases() == 0


async def test_release_ends_leases_nobody_will_pull(producer):
    from mmserve import transport

    refs = [producer.to_ref(torch.ones(1000)) for _ in range(3)]
    await transport.release(refs[:2])
    assert producer.num_live_leases() == 1
