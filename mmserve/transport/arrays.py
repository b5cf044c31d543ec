"""Host arrays as the wire carries them: the dtype name, shape and C-order bytes of a CPU torch tensor or a numpy
array. A numpy array never needs torch: a process that hands on only those (the decoder's front end) never loads it.
"""

from __future__ import annotations

import math

import numpy as np

from mmserve.transport.errors import TensorRefError
from mmserve.v1 import tensor_pb2

ITEM_BYTES = {"uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "float16": 2, "bfloat16": 2, "float32": 4,
              "float64": 8, "bool": 1}  # the dtypes a TensorRef names, and their element sizes


def is_torch(array) -> bool:
    """Whether array is a torch tensor (told without importing torch)."""
    return type(array).__module__.partition(".")[0] == "torch"


def host(array):
    """array contiguous in host memory (a copy only when it is on a GPU or not contiguous)."""
    if is_torch(array):
        return array.detach().to("cpu").contiguous()
    return np.ascontiguousarray(array)


def dtype_name(array) -> str:
    """The TensorRef dtype name of a tensor or array; TensorRefError for dtypes the wire does not carry."""
    name = str(array.dtype).removeprefix("torch.")
    if name not in ITEM_BYTES:
        raise TensorRefError(f"tensor: unsupported dtype {name}")
    return name


def num_bytes(array) -> int:
    return math.prod(array.shape) * ITEM_BYTES[dtype_name(array)]


def as_bytes(array) -> memoryview:
    """The raw C-order bytes of a contiguous host tensor or array, without a copy."""
    if not math.prod(array.shape):
        return memoryview(b"")
    if is_torch(array):
        import torch  # loaded already: array is one of its tensors

        return memoryview(array.reshape(-1).view(torch.uint8).numpy())
    return memoryview(array.reshape(-1).view(np.uint8))


def to_inline(array) -> tensor_pb2.TensorRef:
    """Packs a tensor or array into a TensorRef with inline bytes."""
    array = host(array)
    return tensor_pb2.TensorRef(dtype=dtype_name(array), shape=list(array.shape),
                                inline_data=bytes(as_bytes(array)))
