"""A stage's work retried on other replicas when one is found down: withdrawn, excluded, tried elsewhere.

The one place the router writes "replica down → mark it failed → exclude it → try another", for the decoder,
encoder and llm calls alike.
"""

from __future__ import annotations

import logging

import grpc

from services.router import metrics
from services.router.replicas import Replica, ReplicaPool

log = logging.getLogger(__name__)


class ReplicaDown(Exception):
    """A stage replica was unreachable (UNAVAILABLE); the work may be redone elsewhere."""

    def __init__(self, stage: str, replica: Replica, error: grpc.aio.AioRpcError):
        super().__init__(f"{stage} {replica.address}: {error.code().name}")
        self.stage, self.replica, self.error = stage, replica, error


class Failover:
    """The tries of one piece of work on one stage's replicas."""

    def __init__(self, pool: ReplicaPool, attempts: int, request_id: str):
        self.pool = pool
        self.num_left = attempts
        self.request_id = request_id
        self.exclude: frozenset[str] = frozenset()  # replicas found down during this work

    def retry(self, replica: Replica) -> bool:
        """Withdraws a replica found down (no work until its health says SERVING) and keeps this work away from
        it; whether a try on another replica is left."""
        self.pool.mark_failed(replica)
        self.exclude |= {replica.address}
        self.num_left -= 1
        if self.num_left > 0:
            metrics.RETRIES.labels(self.pool.stage).inc()
            log.warning("%s: %s %s unavailable, retrying elsewhere", self.request_id, self.pool.stage,
                        replica.address)
        return self.num_left > 0


def is_down(err: grpc.aio.AioRpcError) -> bool:
    """Whether a failed call says its replica is gone rather than the request bad."""
    return err.code() == grpc.StatusCode.UNAVAILABLE


async def stream_from(stage: str, replica: Replica, stream):
    """The stream's messages; a replica found down is reported as ReplicaDown."""
    try:
        async for message in stream:
            yield message
    except grpc.aio.AioRpcError as err:
        if is_down(err):
            raise ReplicaDown(stage, replica, err) from None
        raise


async def answer_from(stage: str, replica: Replica, call):
    """The unary call's answer; a replica found down is reported as ReplicaDown."""
    try:
        return await call
    except grpc.aio.AioRpcError as err:
        if is_down(err):
            raise ReplicaDown(stage, replica, err) from None
        raise
