"""TensorRef transport: how tensors cross process boundaries (inline bytes or POSIX shared memory).

Producers call `to_ref`, which uses the process's `TensorStore` (installed by `rpc.Service`) to pick the
transport; consumers call `from_ref`, which maps shared memory without a copy and releases its lease.
CUDA IPC and remote pull are not implemented: a ref from another host fails with `TensorUnavailable`.
"""

from __future__ import annotations

import torch

from mmserve.transport import shm
from mmserve.transport.refs import TensorRefError, TensorUnavailable, concat, from_ref, to_inline
from mmserve.transport.store import POLICIES, TensorStore, caller_domain
from mmserve.v1 import tensor_pb2

__all__ = ["POLICIES", "TensorRefError", "TensorStore", "TensorUnavailable", "caller_domain", "caller_metadata",
           "concat", "current_store", "from_ref", "install_store", "to_inline", "to_ref"]

CALLER_DOMAIN_HEADER = "mmserve-shm-domain"
_store: TensorStore | None = None


def install_store(store: TensorStore | None) -> None:
    """Makes store the process's producer-side store (None: every ref is inline)."""
    global _store
    _store = store


def current_store() -> TensorStore | None:
    """The process's store, if a service installed one."""
    return _store


def to_ref(tensor: torch.Tensor) -> tensor_pb2.TensorRef:
    """Packs a tensor for another process: through the process's store, else inline."""
    return _store.to_ref(tensor) if _store is not None else to_inline(tensor)


def caller_metadata() -> tuple[tuple[str, str], ...]:
    """gRPC metadata declaring our shared-memory domain, so producers on our host answer with shared memory."""
    return ((CALLER_DOMAIN_HEADER, shm.domain()),)
