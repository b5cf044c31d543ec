"""A least-recently-used map bounded by the bytes of its values (plain Python)."""

from __future__ import annotations

import collections
from typing import Generic, TypeVar

V = TypeVar("V")


class ByteLRU(Generic[V]):
    """Keeps the most recently used entries whose sizes add up to at most max_bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._entries: collections.OrderedDict[str, tuple[V, int]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> V | None:
        """The value under key (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, value: V, nbytes: int) -> None:
        """Stores value, evicting the least recently used entries; a value larger than the bound is not kept."""
        self.pop(key)
        if nbytes > self.max_bytes:
            return
        self._entries[key] = (value, nbytes)
        self.num_bytes += nbytes
        while self.num_bytes > self.max_bytes:
            _, (_, size) = self._entries.popitem(last=False)
            self.num_bytes -= size

    def pop(self, key: str) -> V | None:
        """Removes and returns the value under key, or None."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.num_bytes -= entry[1]
        return entry[0]
