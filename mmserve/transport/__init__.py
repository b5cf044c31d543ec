"""TensorRef transport: how tensors cross process boundaries (inline bytes, POSIX shared memory, remote pull,
CUDA IPC).

Producers call `to_ref`, which uses the process's `TensorStore` (installed by `rpc.Service`) to pick the
transport; consumers `await resolve(ref)`, which maps shared memory without a copy (and releases its lease),
pulls remote tensors from their producer's TensorStore service (`serve` adds it to a server) and opens CUDA IPC
handles. `from_ref` is the synchronous path for refs without remote or CUDA IPC parts.
"""

from __future__ import annotations

import glob
import importlib
import sys
from typing import TYPE_CHECKING

import grpc

from mmserve.transport import shm
from mmserve.transport.errors import TensorRefError, TensorUnavailable
from mmserve.transport.handles import concat, leased_parts, release
from mmserve.transport.shm import caller_domain
from mmserve.v1 import tensor_pb2

if TYPE_CHECKING:
    import numpy as np
    import torch

    from mmserve.transport.arrays import to_inline
    from mmserve.transport.refs import from_ref
    from mmserve.transport.consume import resolve, resolve_all
    from mmserve.transport.store import POLICIES, TensorStore

__all__ = ["POLICIES", "TensorRefError", "TensorStore", "TensorUnavailable", "caller_domain", "caller_metadata",
           "concat", "current_store", "from_ref", "install_store", "leased_parts", "release", "resolve",
           "resolve_all", "serve", "to_inline", "to_ref"]

# The tensor half, imported on first use: a process that only moves handles (the router) never loads torch.
_LAZY = {"from_ref": "refs", "to_inline": "arrays", "resolve": "consume", "resolve_all": "consume",
         "POLICIES": "store", "TensorStore": "store"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


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
    from mmserve.transport import remote

    remote.add_to_server(store, server)
    store.address = address


def to_ref(tensor: torch.Tensor | np.ndarray) -> tensor_pb2.TensorRef:
    """Packs a tensor (or a numpy array: no torch needed) for another process: through the process's store, else
    inline."""
    if _store is not None:
        return _store.to_ref(tensor)
    from mmserve.transport.arrays import to_inline

    return to_inline(tensor)


def caller_metadata() -> tuple[tuple[str, str], ...]:
    """gRPC metadata declaring our shared-memory domain and the GPUs we see, so producers on our host answer with
    shared memory (or CUDA IPC for a tensor on one of our GPUs), and producers elsewhere with remote refs."""
    gpus = _visible_gpus()
    return ((CALLER_DOMAIN_HEADER, (shm.domain() or _NO_SHM) + (f"|{','.join(gpus)}" if gpus else "")),)


def _visible_gpus() -> tuple[str, ...]:
    """UUIDs of the GPUs this process sees; without torch loaded and no NVIDIA device node, none (no torch import)."""
    if "torch" not in sys.modules and not glob.glob("/dev/nvidia[0-9]*"):
        return ()
    from mmserve.transport import cuda_ipc

    return cuda_ipc.visible_gpus()
