"""Ports for a stack's services: free now, never given twice in one process, below the kernel's ephemeral range."""

from __future__ import annotations

import pathlib
import random
import socket

# Ports given out (or reserved) in this process. A port is only held once its service binds it, so the kernel may
# offer the same free port twice in a row: one stack then had two services on one port (the second failed to bind,
# and the router's calls for it reached the first: UNIMPLEMENTED, its health check passing).
_GIVEN: set[tuple[str, int]] = set()
EPHEMERAL_RANGE = pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PORT = 20000  # free_port's ports lie from here to the kernel's ephemeral range


def _ephemeral_low() -> int:
    """The first port the kernel hands out to outgoing connections (Linux's default where it cannot be read)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _kernel_pick(host: str) -> int:
    """A port the kernel says is free now (from its ephemeral range)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (connections lingering in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def reserve(host: str, *ports: int) -> None:
    """Ports this process's stack has from elsewhere (the router's --port): free_port never gives them."""
    _GIVEN.update((host, port) for port in ports if port)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now, never one this process was given before, and below the kernel's
    ephemeral range: a port the kernel picks (bind to 0) is one an outgoing connection may take as its own while
    the service is down, and a restarted stage could then not bind it again."""
    low = _ephemeral_low()
    ours = range(LOWEST_PORT, low) if low - LOWEST_PORT >= 1024 else None  # else the kernel's pick
    for _ in range(1000):
        port = random.choice(ours) if ours else _kernel_pick(host)
        if (host, port) not in _GIVEN and port_is_free(host, port):
            _GIVEN.add((host, port))
            return port
    raise OSError(f"no free port on {host} from {LOWEST_PORT} below {low}")
