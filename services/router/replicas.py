"""Replica pools: health-watched channels to one stage's replicas, least-slack slots, p2c selection."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmserve import rpc
from services.router.policy import SlackQueue
from services.router.selection import Selector

log = logging.getLogger(__name__)

_GRID = 1024  # outstanding work is counted in 1/1024 ms


class NoReplicaError(Exception):
    """No healthy replica of a stage can take the work."""


class PoolFull(Exception):
    """As many calls as allowed already wait for a replica of the stage (overload: RESOURCE_EXHAUSTED)."""


@dataclasses.dataclass(eq=False)
class Replica:
    address: str
    channel: grpc.aio.Channel
    stub: Any
    costs: Any  # the stage's cost model for this replica
    healthy: bool = False
    enabled: bool = True  # False: a flex replica serving in the other stage's pool (no new work here)
    removed: bool = False  # left the registry: no new work, closed once idle
    num_in_flight: int = 0
    outstanding_ms: float = 0.0  # predicted work handed to it and not yet done
    last_used: float = 0.0  # monotonic seconds when a call on it last started or ended
    watcher: asyncio.Task | None = None
    idle: asyncio.Event | None = None  # set when its last call ends, for draining before a role switch


class ReplicaPool:
    """Every replica of one stage: membership, health, and slots for calls.

    With policy "slo" each replica takes at most max_in_flight calls at once and the waiting calls are
    served least slack first; which replica takes a call is the Selector's choice (selection.py). With policy
    "fcfs" calls go round-robin straight to the replicas, which queue them in arrival order.
    """

    def __init__(self, stage: str, stub_class, *, max_message_bytes: int, make_costs: Callable[[], Any],
                 policy: str = "slo", max_in_flight: int = 0, affinity_slack: float = 1.5,
                 affinity_entries: int = 4096, unhealthy_wait_s: float = 2.0, client_tls: Any = None,
                 channel_options: tuple[tuple[str, int], ...] = (), max_waiting: int = 0, refresh_s: float = 5.0):
        self.stage = stage
        self.health_service = rpc.STAGE_SERVICES.get(stage, "")  # what its replicas' health is asked under
        self.max_waiting = max_waiting  # calls that may wait for a slot (0: no limit); more get PoolFull
        self.channel_options = channel_options  # e.g. keepalive_options(): how a stalled replica is noticed
        self.client_tls = client_tls  # rpc.channel's TLS for the replicas (None: plaintext)
        self.stub_class = stub_class
        self.max_message_bytes = max_message_bytes
        self.make_costs = make_costs
        self.unhealthy_wait_s = unhealthy_wait_s
        self.selector = Selector(policy=policy, max_in_flight=max_in_flight, affinity_slack=affinity_slack,
                                 affinity_entries=affinity_entries, refresh_s=refresh_s)
        self.replicas: dict[str, Replica] = {}
        self._waiters = SlackQueue()
        self._healthy_changed = asyncio.Event()

    # Membership -----------------------------------------------------------------------------------

    def add(self, address: str, enabled: bool = True) -> None:
        """Starts using a replica as soon as its health service reports SERVING (and it is enabled)."""
        if address in self.replicas and not self.replicas[address].removed:
            return
        channel = rpc.channel(address, self.max_message_bytes, self.client_tls, self.channel_options)
        replica = Replica(address, channel, self.stub_class(channel), self.make_costs(), enabled=enabled)
        replica.watcher = asyncio.ensure_future(self._watch(replica))
        self.replicas[address] = replica

    def remove(self, address: str) -> None:
        """Stops sending work to a replica; its channel closes once its calls have ended."""
        replica = self.replicas.pop(address, None)
        if replica is None:
            return
        replica.removed = True
        replica.healthy = False
        replica.watcher.cancel()
        if replica.num_in_flight == 0:
            asyncio.ensure_future(replica.channel.close())

    def set_addresses(self, addresses: list[str]) -> None:
        """Makes the pool exactly these replicas (from static lists and the registry)."""
        for address in set(self.replicas) - set(addresses):
            log.info("%s %s left the registry", self.stage, address)
            self.remove(address)
        for address in addresses:
            self.add(address)

    @property
    def num_waiting(self) -> int:
        return len(self._waiters)

    @property
    def num_in_flight(self) -> int:
        """Calls in flight on any of its replicas, healthy or not."""
        return sum(r.num_in_flight for r in self.replicas.values())

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.healthy and r.enabled]

    def set_enabled(self, address: str, enabled: bool) -> None:
        """Lets a replica take new work here, or stops it (its calls in flight go on): role switching."""
        replica = self.replicas[address]
        replica.enabled = enabled
        if enabled:
            self._set_healthy(replica, replica.healthy)  # wakes waiters when it can take work at once

    async def drained(self, address: str, timeout_s: float) -> None:
        """Returns once the replica has no call in flight here; TimeoutError after timeout_s."""
        replica = self.replicas[address]
        async with asyncio.timeout(timeout_s):
            while replica.num_in_flight:
                replica.idle = asyncio.Event()
                await replica.idle.wait()

    def mark_failed(self, replica: Replica) -> None:
        """A call found the replica unreachable: no work until its health service says SERVING again."""
        if replica.removed or not replica.healthy:
            return
        log.warning("%s %s unavailable; withdrawn until healthy", self.stage, replica.address)
        replica.healthy = False
        replica.watcher.cancel()  # a fresh Watch reports the current status at once
        replica.watcher = asyncio.ensure_future(self._watch(replica))

    async def _watch(self, replica: Replica) -> None:
        stub = health_pb2_grpc.HealthStub(replica.channel)
        # At most 1 s between checks, and no longer than between reconnections: `mmserve up` sets those to 100 ms,
        # so a stage that has just started serving is used within that.
        longest = min(1000, dict(self.channel_options).get("grpc.max_reconnect_backoff_ms", 1000)) / 1e3
        delay = min(0.05, longest)
        while True:
            call = stub.Watch(health_pb2.HealthCheckRequest(service=self.health_service))
            try:
                async for reply in call:
                    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                    if serving != replica.healthy:
                        log.info("%s %s %s", self.stage, replica.address, "healthy" if serving else "not serving")
                    self._set_healthy(replica, serving)
                    if not serving:
                        # A draining server exits once its calls end, open streams included: ours must not
                        # hold it for its whole grace period. Asked again after the pause below.
                        break
                    delay = min(0.05, longest)
            except grpc.aio.AioRpcError as err:
                if replica.healthy:  # once per spell: a replica that is down fails every Watch until it is back
                    log.warning("%s %s: health stream lost (%s: %s); withdrawn until healthy", self.stage,
                                replica.address, err.code().name, err.details())
            finally:
                call.cancel()
            self._set_healthy(replica, False)
            await asyncio.sleep(delay)
            delay = min(longest, delay * 2)

    def _set_healthy(self, replica: Replica, healthy: bool) -> None:
        replica.healthy = healthy
        if healthy:
            self._healthy_changed.set()
            self._healthy_changed = asyncio.Event()
            self._dispatch()

    async def wait_healthy(self, timeout_s: float, exclude: frozenset[str] = frozenset()) -> None:
        """Waits until at least one replica (not in exclude) is healthy."""
        async with asyncio.timeout(timeout_s):
            while not any(r.address not in exclude for r in self.healthy()):
                await self._healthy_changed.wait()

    async def close(self) -> None:
        for replica in list(self.replicas.values()):
            replica.watcher.cancel()
            await replica.channel.close()
        self.replicas.clear()

    # Selection ------------------------------------------------------------------------------------

    def choose(self, predict_ms: Callable[[Replica], float], affinity: str | None = None,
               exclude: frozenset[str] = frozenset()) -> Replica | None:
        """The replica for the next call among those with room, or None."""
        return self.selector.choose(self.replicas.values(), predict_ms, affinity, exclude)

    def remember(self, affinity: str, replica: Replica) -> None:
        """Records where a media item's work went, so its next request can go there too."""
        self.selector.remember(affinity, replica)

    @contextlib.asynccontextmanager
    async def slot(self, *, latest_start: float, work_ms: Callable[[Replica], float],
                   affinity: str | None = None, exclude: frozenset[str] = frozenset()):
        """A replica to call, held for the duration of the call; waits least-slack first when all are busy."""
        if not any(r.address not in exclude for r in self.healthy()):
            try:  # a replica that is restarting, or just registered, gets a moment to report SERVING
                await self.wait_healthy(self.unhealthy_wait_s, exclude)
            except TimeoutError:
                raise NoReplicaError(f"no healthy {self.stage} replica") from None
        found = None
        if not len(self._waiters):
            found = self.choose(work_ms, affinity, exclude)
        if found is None:
            if self.max_waiting and len(self._waiters) >= self.max_waiting:
                raise PoolFull(f"over capacity: {len(self._waiters)} {self.stage} calls already wait for a "
                               "replica; retry later")
            replica, predicted = await self._wait_for_slot(latest_start, work_ms, affinity, exclude)
        else:
            replica, predicted = found, self._acquire(found, work_ms(found))
        try:
            yield replica
        finally:
            self._release(replica, predicted)  # what was added, though the cost models moved since

    async def _wait_for_slot(self, latest_start, work_ms, affinity, exclude) -> tuple[Replica, float]:
        waiter = _Waiter(asyncio.get_running_loop().create_future(), work_ms, affinity, exclude)
        self._waiters.push(latest_start, waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release(*waiter.future.result())
            else:
                self._waiters.discard(waiter)
            raise

    def _acquire(self, replica: Replica, predicted_ms: float) -> float:
        replica.last_used = time.monotonic()  # one probe of a stale replica at a time, not a burst
        # On a grid of 1/1024 ms the sums are exact in floating point, so calls released in any order (a
        # cancelled burst) leave outstanding_ms exactly where it was, not a rounding error off or clamped.
        predicted_ms = round(predicted_ms * _GRID) / _GRID
        replica.num_in_flight += 1
        replica.outstanding_ms += predicted_ms
        return predicted_ms

    def _release(self, replica: Replica, predicted_ms: float) -> None:
        replica.last_used = time.monotonic()
        replica.num_in_flight -= 1
        replica.outstanding_ms = max(0.0, replica.outstanding_ms - predicted_ms)
        if replica.removed and replica.num_in_flight == 0:
            asyncio.ensure_future(replica.channel.close())
        if replica.num_in_flight == 0 and replica.idle is not None:
            replica.idle.set()
        self._dispatch()

    def _dispatch(self) -> None:
        """Hands free slots to the most urgent waiters."""
        skipped = []
        while len(self._waiters):
            waiter = self._waiters.pop()
            if waiter.future.done():
                continue
            replica = self.choose(waiter.work_ms, waiter.affinity, waiter.exclude)
            if replica is None:
                skipped.append(waiter)
                if not any(self.selector.has_room(r) for r in self.replicas.values()):
                    break
                continue
            waiter.future.set_result((replica, self._acquire(replica, waiter.work_ms(replica))))
        for waiter in skipped:
            self._waiters.push(float("-inf"), waiter)  # keeps its turn at the front


@dataclasses.dataclass(eq=False)
class _Waiter:
    future: asyncio.Future
    work_ms: Callable[[Replica], float]
    affinity: str | None
    exclude: frozenset[str]


def keepalive_options(keepalive_ms: int, timeout_ms: int, reconnect_max_ms: int) -> tuple[tuple[str, int], ...]:
    """Channel options that notice a replica that stops answering while its TCP connection stays up.

    A stopped or wedged process keeps its socket open (the kernel still acknowledges), so neither the
    health Watch stream nor the calls on it would end before their deadlines. HTTP/2 pings every
    keepalive_ms, unanswered for timeout_ms, close the connection: every call on it ends UNAVAILABLE at
    once (and is retried elsewhere when nothing was streamed yet), the Watch ends, and the replica is
    withdrawn until a fresh Watch sees SERVING. Pings cost no RPC and nothing polls.
    """
    return (("grpc.keepalive_time_ms", keepalive_ms), ("grpc.keepalive_timeout_ms", timeout_ms),
            ("grpc.http2.ping_timeout_ms", timeout_ms),  # what gRPC 1.85 enforces on an unanswered ping
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_reconnect_backoff_ms", reconnect_max_ms))


def is_client_error(err: grpc.aio.AioRpcError) -> bool:
    """Statuses that describe the request rather than the replica; passed to the client unchanged."""
    return err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                          grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
