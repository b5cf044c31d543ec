"""TensorRef handles without their tensors: joining refs, their leases and releasing them (no torch).

What the router needs: it moves handles, never bytes, so it imports this and never torch.
"""

from __future__ import annotations

import asyncio

from mmserve.transport import remote
from mmserve.transport.errors import TensorRefError
from mmserve.v1 import tensor_pb2


def concat(refs: list[tensor_pb2.TensorRef]) -> tensor_pb2.TensorRef:
    """A ref to the concatenation of refs along dim 0, without touching their bytes (the router's join)."""
    if len(refs) == 1:
        return refs[0]
    if not refs or any(r.dtype != refs[0].dtype or list(r.shape[1:]) != list(refs[0].shape[1:]) for r in refs):
        raise TensorRefError("tensor: concat needs at least one part, all of one dtype and trailing shape")
    shape = [sum(r.shape[0] for r in refs), *refs[0].shape[1:]]
    return tensor_pb2.TensorRef(dtype=refs[0].dtype, shape=shape, concat=tensor_pb2.TensorRefList(parts=refs))


def leased_parts(ref: tensor_pb2.TensorRef) -> list[tensor_pb2.RemoteRef | tensor_pb2.CudaIpcRef]:
    """The refs inside ref (itself, or parts of a concatenation) held under a lease their consumer releases:
    remote and CUDA IPC."""
    location = ref.WhichOneof("location")
    if location in ("remote", "cuda_ipc"):
        return [getattr(ref, location)]
    if location == "concat":
        return [r for part in ref.concat.parts for r in leased_parts(part)]
    return []


async def release(refs: list[tensor_pb2.TensorRef]) -> None:
    """Ends the leases of remote refs nobody will resolve (shared memory needs nothing: unclaimed leases expire)."""
    parts = [r for ref in refs for r in leased_parts(ref)]
    if parts:
        await asyncio.shield(remote.release(parts))
