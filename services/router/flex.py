"""Role switching at run time: each flex replica serves in one stage pool at a time, moved as load shifts."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from services.router import metrics
from services.router.pools import Pools
from services.router.rebalance import STAGES, Move, RoleBalancer, StageLoad

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FlexReplica:
    """One `stack.flex` process: its Encoder and its Llm service addresses (RouterConfig.flex_pairs)."""

    encoder: str
    llm: str

    @property
    def name(self) -> str:
        return f"{self.encoder}/{self.llm}"

    def address(self, stage: str) -> str:
        return self.encoder if stage == "encoder" else self.llm


class RoleSwitcher:
    """Places the flex replicas in the llm pool, then every tick asks the balancer whether one should move.

    A move takes the replica out of its pool at once (no new work), waits until its calls there are done (at
    most drain_timeout_s), then lets the other pool use it.
    """

    def __init__(self, pools: Pools, backlog_ms, flex: list[FlexReplica], balancer: RoleBalancer, *,
                 tick_s: float = 0.5, drain_timeout_s: float = 30.0):
        self.pools = pools
        self.backlog_ms = backlog_ms  # stage -> predicted outstanding work in ms (the admission controller's)
        self.flex = {f.name: f for f in flex}
        self.balancer = balancer
        self.tick_s = tick_s
        self.drain_timeout_s = drain_timeout_s
        self.roles = {f.name: "llm" for f in flex}
        for f in flex:
            self._pool("encoder").add(f.encoder, enabled=False)
            self._pool("llm").add(f.llm)
            self._report(f.name)

    def _pool(self, stage: str):
        return self.pools.encoders if stage == "encoder" else self.pools.llms

    def loads(self) -> dict[str, StageLoad]:
        return {stage: StageLoad(self.backlog_ms(stage), len(self._pool(stage).healthy())) for stage in STAGES}

    async def run(self) -> None:
        """The control loop: a tick, not an event, because imbalance must last sustain_s before anything moves."""
        while True:
            await asyncio.sleep(self.tick_s)
            move = self.balancer.decide(time.monotonic(), self.loads(), self.roles)
            if move is not None:
                await self.move(move)

    async def move(self, move: Move) -> None:
        flex = self.flex[move.address]
        source, target = self._pool(move.source), self._pool(move.target)
        log.info("moving flex replica %s from the %s pool to the %s pool", flex.name, move.source, move.target)
        source.set_enabled(flex.address(move.source), False)
        self.roles[flex.name] = move.target
        try:
            await source.drained(flex.address(move.source), self.drain_timeout_s)
        except TimeoutError:
            log.warning("flex replica %s: %s calls still running after %.0f s; moving anyway", flex.name,
                        move.source, self.drain_timeout_s)
        target.set_enabled(flex.address(move.target), True)
        metrics.ROLE_SWITCHES.labels(move.target).inc()
        self._report(flex.name)

    def _report(self, name: str) -> None:
        for stage in STAGES:
            metrics.FLEX_ROLE.labels(name, stage).set(1 if self.roles[name] == stage else 0)
