"""TensorRef transport: how tensors cross process boundaries (inline bytes, POSIX shared memory, remote pull,
CUDA IPC).

Producers call `to_ref`, which uses the process's `TensorStore` (installed by `rpc.Service`) to pick the
transport; consumers `await resolve(ref)`, which maps shared memory without a copy (and releases its lease),
pulls remote tensors from their producer's TensorStore service (`serve` adds it to a server) and opens CUDA IPC
handles. `from_ref` is the synchronous path for refs without remote or CUDA IPC parts.
"""

from __future__ import annotations

import grpc
import torch

from mmserve.transport import cuda_ipc, remote, shm
from mmserve.transport.refs import TensorRefError, TensorUnavailable, concat, from_ref, to_inline
from mmserve.transport.resolve import leased_parts, release, resolve, resolve_all
from mmserve.transport.store import POLICIES, TensorStore, caller_domain
from mmserve.v1 import tensor_pb2

__all__ = ["POLICIES", "TensorRefError", "TensorStore", "TensorUnavailable", "caller_domain", "caller_metadata",
           "concat", "current_store", "from_ref", "install_store", "leased_parts", "release", "resolve",
           "resolve_all", "serve", "to_inline", "to_ref"]

CALLER_DOMAIN_HEADER = "mmserve-shm-domain"
_NO_SHM = "no-shm"  # a caller without /dev/shm still says it is one of ours (it can pull remote refs)
_store: TensorStore | None = None


def install_store(store: TensorStore | None) -> None:
    """Makes store the process's producer-side store (None: every ref is inline)."""
    global _store
    _store = store


def current_store() -> TensorStore | None:
    """The process's store, if a service installed one."""
    return _store


def serve(store: TensorStore, server: grpc.aio.Server, address: str) -> None:
    """Serves store's held tensors on server (before it starts); consumers pull them from address (host:port)."""
    remote.add_to_server(store, server)
    store.address = address


def to_ref(tensor: torch.Tensor) -> tensor_pb2.TensorRef:
    """Packs a tensor for another process: through the process's store, else inline."""
    return _store.to_ref(tensor) if _store is not None else to_inline(tensor)


def caller_metadata() -> tuple[tuple[str, str], ...]:
    """gRPC metadata declaring our shared-memory domain and the GPUs we see, so producers on our host answer with
    shared memory (or CUDA IPC for a tensor on one of our GPUs), and producers elsewhere with remote refs."""
    gpus = cuda_ipc.visible_gpus()
    return ((CALLER_DOMAIN_HEADER, (shm.domain() or _NO_SHM) + (f"|{','.join(gpus)}" if gpus else "")),)
