"""Which replica takes a call: plain Python over a read-only view of each replica, testable with no server.

With policy "slo" the replica is chosen by predicted completion (its outstanding work plus this call's) among
two random candidates (power of two choices), or by cache affinity when that replica is not much worse. A
replica that served nothing for refresh_s is preferred once: predictions come from what each replica's calls
report, so one that looked slow (a stall, a busy moment) would otherwise never be measured again. With policy
"fcfs" calls go round-robin.
"""

from __future__ import annotations

import collections
import itertools
import random
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol


class ReplicaView(Protocol):
    """What selection and admission read of a replica (the pool's live Replica is one)."""

    address: str
    healthy: bool
    enabled: bool  # False: a flex replica serving in the other stage's pool
    num_in_flight: int
    outstanding_ms: float  # predicted work handed to it and not yet done
    last_used: float  # monotonic seconds when a call on it last started or ended
    costs: Any  # the stage's cost model for this replica


class StageView(Protocol):
    """What admission reads of a stage's pool."""

    def healthy(self) -> list[ReplicaView]: ...

    @property
    def num_in_flight(self) -> int: ...


class Selector:
    """The choice of replica for each call, and the memory of where each media item's work went (affinity)."""

    def __init__(self, *, policy: str = "slo", max_in_flight: int = 0, affinity_slack: float = 1.5,
                 affinity_entries: int = 4096, refresh_s: float = 5.0, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self.max_in_flight = max_in_flight  # calls one replica takes at once (0: no limit)
        self.affinity_slack = affinity_slack
        self.refresh_s = refresh_s
        self._rng = rng or random.Random()
        self._clock = clock
        self._round_robin = itertools.count()
        self._affinity: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._affinity_entries = affinity_entries

    def has_room(self, replica: ReplicaView) -> bool:
        """Whether the replica can take another call now."""
        return (replica.healthy and replica.enabled
                and (self.max_in_flight == 0 or replica.num_in_flight < self.max_in_flight))

    def choose(self, replicas: Iterable[ReplicaView], predict_ms: Callable[[Any], float],
               affinity: str | None = None, exclude: frozenset[str] = frozenset()) -> Any:
        """The replica for the next call among those with room (not excluded), or None."""
        candidates = [r for r in replicas if self.has_room(r) and r.address not in exclude]
        if not candidates:
            return None
        if self.policy == "fcfs":
            return candidates[next(self._round_robin) % len(candidates)]
        pair = self._rng.sample(candidates, min(2, len(candidates)))
        stale = [r for r in pair if self._clock() - r.last_used > self.refresh_s]
        best = min(stale or pair, key=lambda r: r.outstanding_ms + predict_ms(r))
        sticky = next((r for r in candidates if r.address == self._affinity.get(affinity)), None)
        if sticky is not None and (sticky.outstanding_ms + predict_ms(sticky)
                                   <= self.affinity_slack * (best.outstanding_ms + predict_ms(best)) + 1.0):
            return sticky
        return best

    def remember(self, affinity: str, replica: ReplicaView) -> None:
        """Records where a media item's work went, so its next request can go there too."""
        self._affinity[affinity] = replica.address
        self._affinity.move_to_end(affinity)
        while len(self._affinity) > self._affinity_entries:
            self._affinity.popitem(last=False)
