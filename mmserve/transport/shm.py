"""POSIX shared-memory segments under /dev/shm: naming, creating, mapping, and reaping orphans (plain OS calls)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import mmap
import os
import pathlib
import re

# The shared-memory domain of the process that called us, then "|" and the UUIDs of the GPUs it sees (if any); a
# server interceptor sets it per RPC from the header transport.caller_metadata() sends.
caller_domain: contextvars.ContextVar[str] = contextvars.ContextVar("mmserve_caller_domain", default="")

SHM_DIR = pathlib.Path("/dev/shm")
# mmserve-<pid namespace>-<pid>-<process start time>-<sequence>: enough to tell whether the owner still lives.
_NAME = re.compile(r"^mmserve-(\d+)-(\d+)-(\d+)-(\d+)$")


class BadSegment(ValueError):
    """A segment name or size that no producer of ours would emit."""


class SegmentGone(Exception):
    """The segment no longer exists: its lease expired, it was consumed, or its producer stopped."""


class ForeignDomain(Exception):
    """The segment lives on another host (or another /dev/shm) and cannot be mapped here."""


@functools.cache
def domain() -> str:
    """Who can map our segments: the kernel boot id plus the /dev/shm filesystem; empty without /dev/shm."""
    try:
        boot_id = pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        if not os.access(SHM_DIR, os.W_OK):
            return ""
        return f"{boot_id}:{os.stat(SHM_DIR).st_dev}"
    except OSError:
        return ""


def _pid_namespace() -> int:
    try:
        return int(os.readlink("/proc/self/ns/pid").split("[")[1].rstrip("]"))
    except (OSError, IndexError, ValueError):
        return 0


def _start_time(pid: int) -> int | None:
    """The process start time (clock ticks since boot); None when no such process exists."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; comm (field 2) may contain spaces


def owner_prefix(pid: int | None = None) -> str:
    """The name prefix of every segment a process creates."""
    pid = os.getpid() if pid is None else pid
    return f"mmserve-{_pid_namespace()}-{pid}-{_start_time(pid) or 0}-"


def _path(name: str) -> pathlib.Path:
    if not _NAME.match(name):
        raise BadSegment(f"not an mmserve segment name: {name!r}")
    return SHM_DIR / name


def create(name: str, nbytes: int) -> mmap.mmap:
    """A new segment of nbytes, mapped read-write and shared (the producer writes its tensor into it)."""
    path = _path(name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        return mmap.mmap(fd, nbytes)
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)


def write(name: str, data: memoryview) -> None:
    """A new segment holding a copy of data."""
    path = _path(name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)


def exists(name: str) -> bool:
    """Whether the segment still has a name (nobody consumed or reaped it)."""
    return _path(name).exists()


def unlink(name: str) -> bool:
    """Removes the segment's name; memory lives on until the last mapping goes. True if it was there."""
    try:
        _path(name).unlink()
        return True
    except FileNotFoundError:
        return False


def map_and_release(name: str, nbytes: int, segment_domain: str) -> mmap.mmap:
    """Maps a segment copy-on-write (writes stay private) and unlinks it, which releases the producer's lease."""
    path = _path(name)
    if not segment_domain or segment_domain != domain():
        raise ForeignDomain(f"segment {name} is on another host or /dev/shm (its producer should have sent a "
                            "remote ref: was our caller on another host?)")
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SegmentGone(f"segment {name} is gone (lease expired, already consumed, or producer stopped)") from None
    try:
        size = os.fstat(fd).st_size
        if size != nbytes:
            raise BadSegment(f"segment {name} holds {size} bytes, the ref says {nbytes}")
        buffer = mmap.mmap(fd, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError, PermissionError):  # the producer's expiry reaps what we cannot
        path.unlink()
    return buffer


def list_segments(prefix: str = "mmserve-") -> list[str]:
    """Names of the segments under /dev/shm that start with prefix."""
    try:
        return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix) and _NAME.match(p.name))
    except OSError:
        return []


def reap_orphans() -> list[str]:
    """Unlinks segments whose producer (in our pid namespace) has died; returns their names."""
    ours, reaped = _pid_namespace(), []
    for name in list_segments():
        pidns, pid, start, _ = map(int, _NAME.match(name).groups())
        if pidns != ours or _start_time(pid) == start:
            continue  # another namespace cannot be judged from here; a live owner keeps its segments
        if unlink(name):
            reaped.append(name)
    return reaped
