"""Replica pools: one channel per stage replica, picked round-robin (the SLO-aware policy comes later)."""

from __future__ import annotations

import itertools

import grpc

from mmserve import rpc


class ReplicaPool:
    """Channels to every replica of one stage."""

    def __init__(self, stage: str, addresses: list[str], stub_class, max_message_bytes: int):
        if not addresses:
            raise ValueError(f"{stage}: no replica addresses")
        self.stage = stage
        self.channels = [rpc.insecure_channel(a, max_message_bytes) for a in addresses]
        self.stubs = [stub_class(c) for c in self.channels]
        self._next = itertools.cycle(range(len(self.stubs)))

    def pick(self):
        """The stub of the replica to use next."""
        return self.stubs[next(self._next)]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def is_client_error(err: grpc.aio.AioRpcError) -> bool:
    """Statuses that describe the request rather than the replica; passed to the client unchanged."""
    return err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                          grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
