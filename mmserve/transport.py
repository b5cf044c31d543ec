"""TensorRef: how tensors cross process boundaries (inline bytes for now)."""

from __future__ import annotations

import torch

from mmserve.v1 import tensor_pb2

_DTYPES = {
    name: getattr(torch, name)
    for name in ("uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64", "bool")
}


class TensorRefError(ValueError):
    """A TensorRef that does not describe a valid tensor."""


def to_ref(tensor: torch.Tensor) -> tensor_pb2.TensorRef:
    """Packs a CPU tensor into a TensorRef with inline bytes."""
    tensor = tensor.detach().to("cpu").contiguous()
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TensorRefError(f"tensor: unsupported dtype {name}")
    data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return tensor_pb2.TensorRef(dtype=name, shape=list(tensor.shape), inline_data=data)


def from_ref(ref: tensor_pb2.TensorRef) -> torch.Tensor:
    """Materialises the tensor a TensorRef points at."""
    dtype = _DTYPES.get(ref.dtype)
    if dtype is None:
        raise TensorRefError(f"tensor: unknown dtype {ref.dtype!r}")
    if ref.WhichOneof("location") != "inline_data":
        raise TensorRefError(f"tensor: transport {ref.WhichOneof('location')!r} not supported here")
    shape = tuple(ref.shape)
    if any(d < 0 for d in shape):
        raise TensorRefError(f"tensor: negative dimension in shape {shape}")
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(ref.inline_data) != numel * itemsize:
        raise TensorRefError(f"tensor: {len(ref.inline_data)} bytes do not fit shape {shape} of {ref.dtype}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(ref.inline_data), dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)
