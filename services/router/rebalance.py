"""EPD role switching: when the encoder or the llm stage backs up while the other idles, move a flex replica.

A flex replica runs the vision tower and the language model in one process (`mmserve flex`) and serves in
one stage pool at a time. This policy is plain Python: it looks at each stage's predicted backlog per active
replica and proposes a move once the imbalance has lasted `sustain_s`; a replica moved less than `dwell_s`
ago stays put, so a passing burst cannot make replicas flap between the pools.
"""

from __future__ import annotations

import dataclasses

STAGES = ("encoder", "llm")


@dataclasses.dataclass(frozen=True)
class StageLoad:
    """Predicted work queued or running in one stage, and the replicas serving it now."""

    backlog_ms: float
    num_replicas: int

    @property
    def pressure_ms(self) -> float:
        """Backlog per replica: how long new work would wait there."""
        return self.backlog_ms / max(1, self.num_replicas)


@dataclasses.dataclass(frozen=True)
class Move:
    address: str
    source: str
    target: str


class RoleBalancer:
    """Proposes at most one flex replica move at a time, with hysteresis in size (ratio) and in time."""

    def __init__(self, *, ratio: float = 3.0, min_backlog_ms: float = 200.0, sustain_s: float = 2.0,
                 dwell_s: float = 10.0):
        if ratio <= 1.0 or min_backlog_ms < 0 or sustain_s < 0 or dwell_s < 0:
            raise ValueError("ratio: must exceed 1; min_backlog_ms, sustain_s, dwell_s: not negative")
        self.ratio = ratio
        self.min_backlog_ms = min_backlog_ms
        self.sustain_s = sustain_s
        self.dwell_s = dwell_s
        self._short_since: dict[str, float] = {}  # stage -> when it started needing another replica
        self._last_move: dict[str, float] = {}  # flex address -> when it last moved

    def backed_up(self, loads: dict[str, StageLoad]) -> str | None:
        """The stage that needs another replica now, if the other can spare one."""
        for stage, other in (STAGES, STAGES[::-1]):
            busy, idle = loads[stage], loads[other]
            if (busy.pressure_ms >= self.min_backlog_ms and busy.pressure_ms > self.ratio * idle.pressure_ms
                    and idle.num_replicas > 1):
                return stage
        return None

    def decide(self, now: float, loads: dict[str, StageLoad], roles: dict[str, str]) -> Move | None:
        """A move of a flex replica (address -> its stage now) toward the backed-up stage, or None."""
        target = self.backed_up(loads)
        for stage in STAGES:
            if stage != target:
                self._short_since.pop(stage, None)
        if target is None:
            return None
        since = self._short_since.setdefault(target, now)
        if now - since < self.sustain_s:
            return None
        source = STAGES[1 - STAGES.index(target)]
        for address in sorted(a for a, stage in roles.items() if stage == source):
            if now - self._last_move.get(address, float("-inf")) >= self.dwell_s:
                self._last_move[address] = now
                self._short_since.pop(target, None)
                return Move(address, source, target)
        return None
