"""The consumer's side of a TensorRef: shared memory mapped, remote parts pulled into one tensor, CUDA IPC opened."""

from __future__ import annotations

import asyncio
import torch

from mmserve.transport import cuda_ipc, remote
from mmserve.transport.handles import leased_parts, release
from mmserve.transport.errors import TensorRefError
from mmserve.transport.refs import check, flat_bytes, from_ref
from mmserve.v1 import tensor_pb2


async def resolve(ref: tensor_pb2.TensorRef, timeout_s: float | None = None) -> torch.Tensor:
    """The tensor ref points at. Without remote parts it is from_ref's (shared memory mapped, zero copy);
    remote parts are pulled from their producers straight into one preallocated tensor; a CUDA IPC ref whose GPU
    we see comes back on that GPU."""
    if not leased_parts(ref):
        return await asyncio.to_thread(from_ref, ref)
    dtype, shape, _ = check(ref)
    if ref.WhichOneof("location") == "cuda_ipc" and cuda_ipc.can_open(ref.cuda_ipc):
        return await _open(ref, dtype, shape)
    out = torch.empty(shape, dtype=dtype)
    await _fill(ref, flat_bytes(out), timeout_s)
    return out


async def resolve_all(refs: list[tensor_pb2.TensorRef], timeout_s: float | None = None) -> list[torch.Tensor]:
    """The tensors of refs, resolved concurrently; on a failure the rest are cancelled and released."""
    try:
        return await _all(resolve(ref, timeout_s) for ref in refs)
    except BaseException:
        await release(refs)  # those never pulled; a pulled or cancelled one is gone already
        raise


async def _fill(ref: tensor_pb2.TensorRef, dest: torch.Tensor, timeout_s: float | None) -> None:
    """Writes the bytes of ref into dest (uint8, exactly the ref's size)."""
    dtype, shape, nbytes = check(ref)
    if dest.numel() != nbytes:
        raise TensorRefError(f"tensor: a part of shape {shape} does not fit its place in the concatenation")
    location = ref.WhichOneof("location")
    if location == "remote":
        if ref.remote.nbytes != nbytes or not ref.remote.address or not ref.remote.handle_id:
            raise TensorRefError(f"tensor: remote ref of {ref.remote.nbytes} bytes at {ref.remote.address!r} "
                                 f"does not fit shape {shape} of {ref.dtype}")
        if nbytes:
            await remote.pull_into(ref.remote, dest, timeout_s)
        return
    if location == "cuda_ipc":
        if not ref.cuda_ipc.address or not ref.cuda_ipc.handle_id:
            raise TensorRefError("tensor: CUDA IPC ref without its producer's address and lease")
        if cuda_ipc.can_open(ref.cuda_ipc):
            dest.copy_(flat_bytes((await _open(ref, dtype, shape)).cpu()))
        else:
            await remote.pull_into(ref.cuda_ipc, dest, timeout_s)
        return
    if location == "concat":
        parts = list(ref.concat.parts)
        if (not shape or not parts or any(p.dtype != ref.dtype or list(p.shape[1:]) != list(shape[1:]) for p in parts)
                or sum(p.shape[0] if p.shape else -1 for p in parts) != shape[0]):
            raise TensorRefError(f"tensor: concat parts do not make shape {shape} of {ref.dtype}")
        offsets = [0]
        for part in parts:
            offsets.append(offsets[-1] + check(part)[2])
        await _all(_fill(p, dest[a:b], timeout_s) for p, a, b in zip(parts, offsets, offsets[1:]))
        return
    tensor = await asyncio.to_thread(from_ref, ref)
    dest.copy_(flat_bytes(tensor))


async def _open(ref: tensor_pb2.TensorRef, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The CUDA IPC ref's tensor copied on its GPU; the producer's lease ends right after."""
    try:
        return await asyncio.to_thread(cuda_ipc.open_copy, ref, dtype, shape)
    finally:
        await release([ref])


async def _all(coroutines) -> list:
    """Runs coroutines concurrently, returning their results; the first failure cancels the rest (a cancelled
    pull ends its lease)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        if tasks:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

