"""The producer's tensor store: picks the transport, holds tensors under leases (shared memory or for a remote
pull), expires unclaimed leases."""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import prometheus_client

from mmserve.transport import shm
from mmserve.transport.arrays import as_bytes, dtype_name, host, is_torch, num_bytes, to_inline
from mmserve.v1 import tensor_pb2

if TYPE_CHECKING:  # torch is loaded by the first torch tensor or empty(): a store of numpy arrays never needs it
    import numpy as np
    import torch

log = logging.getLogger(__name__)

POLICIES = ("auto", "shm", "remote", "inline")
REFS = prometheus_client.Counter("mmserve_tensor_refs", "Tensors handed to another process, by transport",
                                 ["transport"])  # inline_data, shared_memory, remote, cuda_ipc


def caller_gpus() -> set[str]:
    """UUIDs of the GPUs the current caller sees."""
    gpus = shm.caller_domain.get().partition("|")[2]
    return set(gpus.split(",")) if gpus else set()


class TensorStore:
    """One per process. Tensors above inline_limit_bytes go to shared memory, or stay here for a remote pull,
    under a lease of lease_s seconds.

    The consumer maps a segment and unlinks it, or pulls a held tensor (the pull's end drops it), which ends the
    lease; a lease nobody claims expires and the store frees it; close() frees everything left. Thread-safe.
    A held tensor is kept by reference, not copied: producers do not modify a tensor after handing it off.
    Tensors are torch tensors or numpy arrays (which never load torch).
    """

    def __init__(self, policy: str = "auto", inline_limit_bytes: int = 64 * 1024, lease_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic):
        if policy not in POLICIES:
            raise ValueError(f"transport: {policy!r} is not one of {', '.join(POLICIES)}")
        self.policy = policy
        self.inline_limit_bytes = inline_limit_bytes
        self.lease_s = lease_s
        self.clock = clock
        self.domain = shm.domain() if policy in ("auto", "shm") else ""
        self.address = ""  # where consumers pull held tensors: set by serve() once the server has a port
        self.prefix = shm.owner_prefix()
        self.num_expired = 0  # leases that ran out unclaimed
        self._seq = itertools.count()
        self._leases: dict[str, float] = {}  # segment name -> expiry
        self._allocated: dict[int, str] = {}  # data address -> segment made by empty(), not yet handed off
        self._held: dict[str, tuple[torch.Tensor | np.ndarray, float]] = {}  # remote handle -> (tensor, expiry)
        self._num_pulling = 0  # held tensors claimed by a pull still streaming
        self._cond = threading.Condition(threading.RLock())  # RLock: finalizers may run inside locked code
        self._closed = False
        self._reaper: threading.Thread | None = None
        self._warned = False
        self._listeners: list[Callable[[], None]] = []
        if self.domain:
            for name in shm.reap_orphans():
                log.info("reaped orphaned segment %s of a dead producer", name)

    # --- producing ------------------------------------------------------------------------------------------------

    def transport_for(self, nbytes: int) -> str:
        """How a tensor of nbytes travels to the current caller: "shm", "remote" or "inline".

        auto: shared memory for a caller in our shared-memory domain, a remote pull for a caller that declared
        another one (another host), inline for an unknown caller; small tensors are always inline.
        """
        if nbytes == 0 or nbytes < self.inline_limit_bytes or self.policy == "inline":
            return "inline"
        caller = shm.caller_domain.get().partition("|")[0]
        if self.domain and (self.policy == "shm" or caller == self.domain):
            return "shm"
        if self.address and (self.policy == "remote" or (self.policy == "auto" and caller)):
            return "remote"
        return "inline"

    def uses_shm(self, nbytes: int) -> bool:
        """Whether a tensor of nbytes handed to the current caller goes to shared memory."""
        return self.transport_for(nbytes) == "shm"

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor, in shared memory when it would travel there: to_ref of it copies nothing."""
        import torch

        nbytes = math.prod(shape) * dtype.itemsize
        if not self.uses_shm(nbytes):
            return torch.empty(shape, dtype=dtype)
        name = self._new_name()
        try:
            buffer = shm.create(name, nbytes)
        except OSError as err:
            self._fallback(err)
            return torch.empty(shape, dtype=dtype)
        tensor = torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)
        address = tensor.data_ptr()
        with self._cond:
            self._allocated[address] = name
        # When every view of the mapping is gone, the address may be reused: forget it, and free the
        # segment unless it was handed off.
        weakref.finalize(buffer, self._forget, address, name)
        return tensor

    def to_ref(self, tensor: torch.Tensor | np.ndarray) -> tensor_pb2.TensorRef:
        """A TensorRef for tensor: CUDA IPC, shared memory or a remote pull under a lease when it applies, else
        inline bytes."""
        ref = self._to_ref(tensor)
        REFS.labels(ref.WhichOneof("location")).inc()
        return ref

    def _to_ref(self, tensor: torch.Tensor | np.ndarray) -> tensor_pb2.TensorRef:
        if is_torch(tensor) and tensor.is_cuda and self._shares_gpu(tensor):
            return self._cuda_ref(tensor.detach().contiguous())
        tensor = host(tensor)
        name = dtype_name(tensor)
        nbytes = num_bytes(tensor)
        how = self.transport_for(nbytes)
        if how == "remote":
            return tensor_pb2.TensorRef(dtype=name, shape=list(tensor.shape), remote=tensor_pb2.RemoteRef(
                address=self.address, handle_id=self.hold(tensor), nbytes=nbytes))
        if how == "inline":
            return to_inline(tensor)
        segment = self._take_allocated(tensor, nbytes)
        if segment is None:
            segment = self._new_name()
            try:
                shm.write(segment, as_bytes(tensor))
            except OSError as err:  # e.g. /dev/shm full: slower, never wrong
                self._fallback(err)
                return to_inline(tensor)
        self._lease(segment)
        return tensor_pb2.TensorRef(dtype=name, shape=list(tensor.shape), shared_memory=tensor_pb2.SharedMemoryRef(
            name=segment, nbytes=nbytes, domain=self.domain))

    def _shares_gpu(self, tensor: torch.Tensor) -> bool:
        """auto: a large CUDA tensor stays on its GPU when the caller sees that GPU too (and can release it here)."""
        from mmserve.transport import cuda_ipc

        return (self.policy == "auto" and bool(self.address) and tensor.numel() * tensor.element_size()
                >= max(self.inline_limit_bytes, 1) and cuda_ipc.device_uuid(tensor) in caller_gpus())

    def _cuda_ref(self, tensor: torch.Tensor) -> tensor_pb2.TensorRef:
        from mmserve.transport import cuda_ipc

        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # share exactly the tensor, not the storage around it
        handle = self.hold(tensor)
        return tensor_pb2.TensorRef(dtype=dtype_name(tensor), shape=list(tensor.shape),
                                    cuda_ipc=cuda_ipc.share(tensor, self.address, handle))

    def _new_name(self) -> str:
        return f"{self.prefix}{next(self._seq)}"

    def _take_allocated(self, tensor: torch.Tensor | np.ndarray, nbytes: int) -> str | None:
        if not is_torch(tensor):
            return None  # empty() makes torch tensors only
        storage = tensor.untyped_storage()
        with self._cond:
            if storage.data_ptr() != tensor.data_ptr() or storage.nbytes() != nbytes:
                return None  # a view of part of a segment: copy it
            return self._allocated.pop(tensor.data_ptr(), None)

    def _forget(self, address: int, name: str) -> None:
        with self._cond:
            if self._allocated.get(address) == name:
                del self._allocated[address]
                shm.unlink(name)

    def _fallback(self, err: OSError) -> None:
        if not self._warned:
            log.warning("shared memory unavailable (%s); sending tensors inline", err)
            self._warned = True

    # --- leases ---------------------------------------------------------------------------------------------------

    def hold(self, tensor: torch.Tensor | np.ndarray) -> str:
        """Keeps a contiguous tensor for one remote pull (or CUDA IPC open) under a lease; returns its random
        handle id."""
        if is_torch(tensor) and tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # a view would pin the whole storage it belongs to
        handle = secrets.token_hex(16)  # unguessable: knowing it is the permission to pull
        with self._cond:
            was_idle = not self._leases and not self._held
            self._held[handle] = (tensor, self.clock() + self.lease_s)
            if was_idle:
                self._cond.notify_all()  # wake the reaper
        return handle

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Calls callback (from any thread) whenever held tensors stop being held: claimed, released or expired."""
        self._listeners.append(callback)

    def _notify(self) -> None:
        for callback in self._listeners:
            callback()

    def is_held(self, handle: str) -> bool:
        """Whether the tensor under handle still waits for its pull."""
        with self._cond:
            return handle in self._held

    def claim(self, handle: str) -> torch.Tensor | np.ndarray | None:
        """Takes a held tensor for a pull (None if unknown, expired or already claimed); call end_pull() after."""
        with self._cond:
            held = self._held.pop(handle, None)
            if held is None:
                return None
            self._num_pulling += 1
        self._notify()
        return held[0]

    def end_pull(self) -> None:
        """A pull that claim() started is over, complete or cancelled: its lease is gone."""
        with self._cond:
            self._num_pulling -= 1
            self._cond.notify_all()

    def release(self, handles: list[str]) -> int:
        """Drops held tensors a consumer will not pull; returns how many were still held."""
        with self._cond:
            num = sum(self._held.pop(h, None) is not None for h in handles)
            self._cond.notify_all()
        if num:
            self._notify()
        return num

    def _lease(self, name: str) -> None:
        with self._cond:
            was_idle = not self._leases and not self._held
            self._leases[name] = self.clock() + self.lease_s
            if was_idle:
                self._cond.notify_all()  # the reaper sleeps until the next expiry; there was none

    def reap(self, now: float | None = None) -> float | None:
        """Unlinks segments whose lease expired unclaimed; returns the seconds until the next expiry."""
        now = self.clock() if now is None else now
        with self._cond:
            for name, expiry in list(self._leases.items()):
                if expiry <= now:
                    del self._leases[name]
                    if shm.unlink(name):
                        self.num_expired += 1
                        log.debug("lease on %s expired unclaimed", name)
            expired = [handle for handle, (_, expiry) in self._held.items() if expiry <= now]
            for handle in expired:
                del self._held[handle]
                self.num_expired += 1
            if expired:
                self._notify()
            expiries = [*self._leases.values(), *(expiry for _, expiry in self._held.values())]
            return min(expiries) - now if expiries else None

    def num_live_leases(self) -> int:
        """Leases not yet ended: segments that still exist (a consumer unlinks what it maps), held tensors, and
        pulls in progress."""
        with self._cond:
            for name in [n for n in self._leases if not shm.exists(n)]:
                del self._leases[name]
            return len(self._leases) + len(self._held) + self._num_pulling

    def wait_idle(self, timeout_s: float) -> bool:
        """Blocks until no lease is live (claimed or expired); False on timeout. Needs the reaper running."""
        with self._cond:
            return self._cond.wait_for(lambda: self.num_live_leases() == 0, timeout_s)

    def start(self) -> None:
        """Starts the reaper thread, which sleeps until the next lease expiry."""
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._run_reaper, name="tensor-store-reaper", daemon=True)
            self._reaper.start()

    def _run_reaper(self) -> None:
        with self._cond:
            while not self._closed:
                delay = self.reap()
                self._cond.notify_all()
                self._cond.wait(delay)

    def close(self) -> None:
        """Stops the reaper and unlinks every segment this store still owns."""
        with self._cond:
            self._closed = True
            names = [*self._leases, *self._allocated.values()]
            self._leases.clear()
            self._allocated.clear()
            self._held.clear()
            self._cond.notify_all()
        for name in names:
            shm.unlink(name)
        if self._reaper is not None:
            self._reaper.join()
            self._reaper = None
