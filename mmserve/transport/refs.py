"""Packing and unpacking TensorRefs: inline bytes, shared-memory segments, concatenations (no gRPC here)."""

from __future__ import annotations

import math

import torch

from mmserve.transport import shm
from mmserve.transport.arrays import ITEM_BYTES
from mmserve.transport.errors import TensorRefError, TensorUnavailable
from mmserve.v1 import tensor_pb2

DTYPES = {name: getattr(torch, name) for name in ITEM_BYTES}


def from_ref(ref: tensor_pb2.TensorRef) -> torch.Tensor:
    """Materialises the tensor a TensorRef points at; shared memory is mapped (zero copy) and released."""
    dtype, shape, nbytes = check(ref)
    location = ref.WhichOneof("location")
    if location == "inline_data":
        if len(ref.inline_data) != nbytes:
            raise TensorRefError(f"tensor: {len(ref.inline_data)} bytes do not fit shape {shape} of {ref.dtype}")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(ref.inline_data), dtype=torch.uint8).view(dtype).reshape(shape)
    if location == "shared_memory":
        seg = ref.shared_memory
        if seg.nbytes != nbytes or nbytes == 0:
            raise TensorRefError(f"tensor: segment of {seg.nbytes} bytes does not fit shape {shape} of {ref.dtype}")
        try:
            buffer = shm.map_and_release(seg.name, seg.nbytes, seg.domain)
        except shm.BadSegment as err:
            raise TensorRefError(f"tensor: {err}") from None
        except (shm.ForeignDomain, shm.SegmentGone) as err:
            raise TensorUnavailable(f"tensor: {err}") from None
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)
    if location == "concat":
        parts = [from_ref(p) for p in ref.concat.parts]
        if not parts or any(p.dtype != dtype for p in parts):
            raise TensorRefError("tensor: concat parts are missing or of another dtype")
        try:
            joined = torch.cat(parts) if len(parts) > 1 else parts[0]
        except RuntimeError as err:
            raise TensorRefError(f"tensor: concat parts do not fit together ({err})") from None
        if tuple(joined.shape) != shape:
            raise TensorRefError(f"tensor: concat parts make {tuple(joined.shape)}, not {shape}")
        return joined
    if location == "remote":
        raise TensorRefError("tensor: a remote ref is pulled with `await transport.resolve(ref)`")
    if location == "cuda_ipc":
        raise TensorRefError("tensor: a CUDA IPC ref is opened with `await transport.resolve(ref)`")
    raise TensorRefError(f"tensor: transport {location!r} not supported here")


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a one-dimensional uint8 view."""
    return tensor.reshape(-1).view(torch.uint8)


def check(ref: tensor_pb2.TensorRef) -> tuple[torch.dtype, tuple[int, ...], int]:
    """The dtype, shape and byte size a ref declares; TensorRefError when they are not a valid tensor."""
    dtype = DTYPES.get(ref.dtype)
    if dtype is None:
        raise TensorRefError(f"tensor: unknown dtype {ref.dtype!r}")
    shape = tuple(ref.shape)
    if any(d < 0 for d in shape):
        raise TensorRefError(f"tensor: negative dimension in shape {shape}")
    return dtype, shape, math.prod(shape) * torch.empty((), dtype=dtype).element_size()
