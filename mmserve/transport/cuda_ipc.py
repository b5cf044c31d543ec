"""CUDA IPC refs: a producer's CUDA tensor opened by a consumer that sees the same GPU (torch's storage IPC)."""

from __future__ import annotations

import functools

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from mmserve.transport.errors import TensorUnavailable
from mmserve.v1 import tensor_pb2


@functools.cache
def visible_gpus() -> tuple[str, ...]:
    """UUIDs of the GPUs this process sees, in device-index order (none without CUDA)."""
    if not torch.cuda.is_available():
        return ()
    return tuple(str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count()))


def device_uuid(tensor: torch.Tensor) -> str:
    """The UUID of the GPU holding tensor."""
    return visible_gpus()[tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()]


def share(tensor: torch.Tensor, address: str, handle_id: str) -> tensor_pb2.CudaIpcRef:
    """The IPC handle of a contiguous CUDA tensor the store holds under handle_id (it must outlive the consumer's
    open: the lease keeps it)."""
    _, args = reduce_tensor(tensor)
    (_, _, _, offset, _, _, _, handle, storage_nbytes, storage_offset_bytes, _, counter_handle, counter_offset,
     event_handle, event_sync_required) = args
    return tensor_pb2.CudaIpcRef(
        device_uuid=device_uuid(tensor), handle=handle, storage_nbytes=storage_nbytes,
        storage_offset_bytes=storage_offset_bytes, offset_bytes=offset * tensor.element_size(), address=address,
        handle_id=handle_id, ref_counter_handle=counter_handle, ref_counter_offset=counter_offset,
        event_handle=event_handle or b"", event_sync_required=event_sync_required)


def can_open(ref: tensor_pb2.CudaIpcRef) -> bool:
    """Whether this process sees the GPU the ref's memory is on."""
    return ref.device_uuid in visible_gpus()


def open_copy(ref: tensor_pb2.TensorRef, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A copy, on the same GPU, of the producer's tensor. Copying lets the producer's lease end at once (a view
    would pin its memory for as long as we keep the tensor); a device-to-device copy is cheap."""
    ipc = ref.cuda_ipc
    element_size = torch.empty((), dtype=dtype).element_size()
    strides = torch.empty(shape, dtype=dtype, device="meta").stride()
    try:
        view = rebuild_cuda_tensor(
            torch.Tensor, torch.Size(shape), strides, ipc.offset_bytes // element_size, torch.storage.TypedStorage,
            dtype, visible_gpus().index(ipc.device_uuid), ipc.handle, ipc.storage_nbytes, ipc.storage_offset_bytes,
            False, ipc.ref_counter_handle, ipc.ref_counter_offset, ipc.event_handle or None, ipc.event_sync_required)
        return view.clone()
    except (RuntimeError, ValueError) as err:
        raise TensorUnavailable(f"tensor: cannot open the CUDA IPC handle from {ipc.address} ({err})") from None
