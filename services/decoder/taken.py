"""When the consumer has taken a chunk the decoder handed off, which is what bounds how far a request decodes ahead.

A chunk is taken once its frames no longer need the decoder's memory:
- shared memory: the segment is gone from /dev/shm: the consumer mapped and unlinked it (transport.resolve), or its
  lease expired and the store reaped it. A message sent is not taken: until then the segment holds the frames.
- remote: the held tensor was claimed by a pull, released, or its lease expired.
- inline: the bytes are in the message itself; once gRPC has it, only its flow control bounds the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import struct
from collections.abc import Callable

from mmserve.transport import shm
from mmserve.transport.store import TensorStore
from mmserve.v1 import tensor_pb2

log = logging.getLogger(__name__)

_IN_DELETE = 0x200
_IN_Q_OVERFLOW = 0x4000
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name
# Events wake waiters; this re-check only covers a missed one (inotify's queue overflowed, or no inotify).
RECHECK_S = 1.0


class TakenWatch:
    """Waits for handed-off chunks to be taken: inotify on /dev/shm for segments, the store's listener for held
    tensors. Create and close it on the event loop."""

    def __init__(self, store: TensorStore | None):
        self.store = store
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._loop = asyncio.get_running_loop()
        self._fd = _watch_deletions(shm.SHM_DIR)
        if self._fd is not None:
            self._loop.add_reader(self._fd, self._on_deletions)
        if store is not None:
            store.add_listener(self._on_lease_end)

    async def wait(self, ref: tensor_pb2.TensorRef) -> None:
        """Returns once ref's chunk is taken (at once for an inline ref)."""
        key, is_taken = self._condition(ref)
        if is_taken():
            return
        event = asyncio.Event()
        self._waiters.setdefault(key, set()).add(event)
        try:
            while not is_taken():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), RECHECK_S)
                event.clear()
        finally:
            waiters = self._waiters[key]
            waiters.discard(event)
            if not waiters:
                del self._waiters[key]

    def _condition(self, ref: tensor_pb2.TensorRef) -> tuple[str, Callable[[], bool]]:
        location = ref.WhichOneof("location")
        if location == "shared_memory":
            name = ref.shared_memory.name
            return name, lambda: not shm.exists(name)
        if location in ("remote", "cuda_ipc") and self.store is not None:
            handle = getattr(ref, location).handle_id
            return handle, lambda: not self.store.is_held(handle)
        return "", lambda: True

    def _on_deletions(self) -> None:
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        offset = 0
        while offset + _EVENT.size <= len(data):
            _, mask, _, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size:offset + _EVENT.size + length].split(b"\0", 1)[0].decode(errors="replace")
            offset += _EVENT.size + length
            if mask & _IN_Q_OVERFLOW:
                self._wake_all()
            for event in self._waiters.get(name, ()):
                event.set()

    def _on_lease_end(self) -> None:
        """The store's listener, called from any thread."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._wake_all)

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()

    def close(self) -> None:
        """Stops watching /dev/shm."""
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None


def _watch_deletions(directory: os.PathLike) -> int | None:
    """A non-blocking inotify descriptor reporting names deleted from directory; None where that is unavailable."""
    if not os.path.isdir(directory):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, AttributeError):
        fd = -1
    if fd < 0:
        log.warning("no inotify: taken chunks are noticed within %.0f s instead of at once", RECHECK_S)
        return None
    if libc.inotify_add_watch(fd, os.fsencode(directory), _IN_DELETE) < 0:
        os.close(fd)
        log.warning("cannot watch %s: taken chunks are noticed within %.0f s instead of at once", directory, RECHECK_S)
        return None
    return fd
