"""Remote pull: the TensorStore gRPC service that streams held tensors in chunks, and the consumer's pull."""

from __future__ import annotations

import asyncio
import collections
import logging
import weakref
from typing import TYPE_CHECKING

import grpc
import numpy as np

from mmserve import internal_token, tls
from mmserve.transport.arrays import as_bytes, is_torch
from mmserve.transport.errors import TensorUnavailable
from mmserve.v1 import tensor_pb2

if TYPE_CHECKING:  # the consumer's side (pull, release) needs no torch: the router releases leases too
    import torch

    from mmserve.transport.store import TensorStore

log = logging.getLogger(__name__)

SERVICE = tensor_pb2.DESCRIPTOR.services_by_name["TensorStore"].full_name
# Small enough that HTTP/2 flow control paces the stream and memory in flight stays bounded, large enough
# that per-message overhead does not dominate; under gRPC's default 4 MB message cap.
CHUNK_BYTES = 1024 * 1024
_DATA_TAG = b"\x0a"  # TensorChunk.data: field 1, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_chunk(data: memoryview) -> bytes:
    """A serialised TensorChunk holding data, built with one copy (protobuf would take two)."""
    if not data:
        return b""  # proto3 leaves an empty field out
    return b"".join((_DATA_TAG, _varint(len(data)), data))


def decode_chunk(message: bytes) -> memoryview:
    """TensorChunk.data of a serialised TensorChunk, without a copy."""
    view = memoryview(message)
    if not view:
        return view  # an empty chunk
    if view[0:1] != _DATA_TAG:
        raise TensorUnavailable("tensor: the producer sent a malformed chunk")
    n = shift = 0
    i = 1
    while i < len(view):
        byte = view[i]
        n |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            break
        shift += 7
    if i + n != len(view):
        raise TensorUnavailable("tensor: the producer sent a malformed chunk")
    return view[i:]


class StoreServicer:
    """mmserve.v1.TensorStore: Pull streams a held tensor once; Release drops tensors nobody will pull."""

    def __init__(self, store: TensorStore, chunk_bytes: int = CHUNK_BYTES):
        self.store = store
        self.chunk_bytes = chunk_bytes

    async def Pull(self, request: tensor_pb2.PullRequest, context: grpc.aio.ServicerContext):
        tensor = self.store.claim(request.handle_id)
        if tensor is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"lease {request.handle_id[:8]}… is gone (expired, "
                                                           "already pulled, or the producer restarted)")
        try:
            if is_torch(tensor) and tensor.is_cuda:  # a CUDA IPC ref whose consumer does not see the GPU pulls
                tensor = await asyncio.to_thread(tensor.cpu)
            data = as_bytes(tensor)
            for start in range(0, len(data), self.chunk_bytes):
                yield encode_chunk(data[start:start + self.chunk_bytes])
        finally:  # complete, cancelled or failed: the lease ends with the pull
            self.store.end_pull()

    async def Release(self, request: tensor_pb2.ReleaseRequest, context) -> tensor_pb2.ReleaseResponse:
        return tensor_pb2.ReleaseResponse(num_released=self.store.release(list(request.handle_ids)))


def add_to_server(store: TensorStore, server: grpc.aio.Server) -> None:
    """Serves the store's held tensors on server (raw chunk serialisation, see encode_chunk)."""
    servicer = StoreServicer(store)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Pull": grpc.unary_stream_rpc_method_handler(servicer.Pull, tensor_pb2.PullRequest.FromString, bytes),
        "Release": grpc.unary_unary_rpc_method_handler(servicer.Release, tensor_pb2.ReleaseRequest.FromString,
                                                       tensor_pb2.ReleaseResponse.SerializeToString),
    })])


# One channel per producer address and event loop (a grpc.aio channel belongs to the loop that made it).
_channels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, grpc.aio.Channel]] = (
    weakref.WeakKeyDictionary())


def _channel(address: str) -> grpc.aio.Channel:
    channels = _channels.setdefault(asyncio.get_running_loop(), {})
    if address not in channels:
        client = tls.installed_client()  # under mutual TLS, the producer wants our certificate here too
        interceptors = internal_token.client_interceptors()  # and its TensorStore our internal token
        channels[address] = (grpc.aio.insecure_channel(address, interceptors=interceptors) if client is None else
                             grpc.aio.secure_channel(address, client.credentials(), options=client.options(),
                                                     interceptors=interceptors))
    return channels[address]


def _unavailable(address: str, err: grpc.aio.AioRpcError) -> TensorUnavailable:
    if err.code() == grpc.StatusCode.NOT_FOUND:
        return TensorUnavailable(f"tensor: {err.details()} on producer {address}")
    return TensorUnavailable(f"tensor: producer {address} unavailable ({err.code().name}: {err.details()})")


async def pull_into(ref: tensor_pb2.RemoteRef | tensor_pb2.CudaIpcRef, out: torch.Tensor,
                    timeout_s: float | None = None) -> None:
    """Streams a held tensor's bytes into out (uint8, one dimension, exactly its size), chunk by chunk."""
    dest = out.numpy()
    pull = _channel(ref.address).unary_stream(f"/{SERVICE}/Pull", tensor_pb2.PullRequest.SerializeToString,
                                              decode_chunk)
    call = pull(tensor_pb2.PullRequest(handle_id=ref.handle_id), timeout=timeout_s)
    offset = 0
    try:
        async for data in call:
            if offset + len(data) > len(dest):
                raise TensorUnavailable(f"tensor: producer {ref.address} sent more than {len(dest)} bytes")
            dest[offset:offset + len(data)] = np.frombuffer(data, dtype=np.uint8)
            offset += len(data)
    except grpc.aio.AioRpcError as err:
        raise _unavailable(ref.address, err) from None
    finally:
        call.cancel()  # no-op when the stream ended; otherwise the producer's pull ends and drops the tensor
    if offset != len(dest):
        raise TensorUnavailable(f"tensor: producer {ref.address} sent {offset} of {len(dest)} bytes")


async def release(refs: list[tensor_pb2.RemoteRef | tensor_pb2.CudaIpcRef], timeout_s: float = 5.0) -> None:
    """Best effort: tells the producers of refs nobody will pull them (an unreachable one lets them expire)."""
    by_address: dict[str, list[str]] = collections.defaultdict(list)
    for ref in refs:
        by_address[ref.address].append(ref.handle_id)
    for address, handles in by_address.items():
        call = _channel(address).unary_unary(f"/{SERVICE}/Release", tensor_pb2.ReleaseRequest.SerializeToString,
                                             tensor_pb2.ReleaseResponse.FromString)
        try:
            await call(tensor_pb2.ReleaseRequest(handle_ids=handles), timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            log.debug("release on %s failed (%s); the leases will expire", address, err.code().name)
