"""Replica selection and admission over plain read-only views: no pool, no channel, no event loop."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from services.router.admission import Controller
from services.router.costs import CostSeeds, LlmCosts, MediaShape, TokenCost
from services.router.policy import Slo, SloDefaults
from services.router.selection import Selector


@dataclasses.dataclass
class View:
    address: str
    outstanding_ms: float = 0.0
    healthy: bool = True
    enabled: bool = True
    num_in_flight: int = 0
    last_used: float = 100.0
    costs: Any = dataclasses.field(default_factory=lambda: TokenCost(1.0, 1.0))


@dataclasses.dataclass
class Stage:
    replicas: list[View]

    def healthy(self) -> list[View]:
        return [r for r in self.replicas if r.healthy and r.enabled]

    @property
    def num_in_flight(self) -> int:
        return sum(r.num_in_flight for r in self.replicas)


def selector(**options) -> Selector:
    return Selector(rng=random.Random(0), clock=lambda: 100.0, **options)


def test_the_least_loaded_of_two_is_chosen():
    fast, slow = View("fast", outstanding_ms=10), View("slow", outstanding_ms=500)
    assert all(selector().choose([fast, slow], lambda r: 5.0) is fast for _ in range(20))


def test_replicas_without_room_unhealthy_disabled_or_excluded_are_never_chosen():
    views = [View("busy", num_in_flight=2), View("sick", healthy=False), View("away", enabled=False),
             View("gone"), View("ok", outstanding_ms=1e6)]
    choose = selector(max_in_flight=2).choose
    assert {choose(views, lambda r: 0.0, exclude=frozenset({"gone"})).address for _ in range(20)} == {"ok"}
    assert choose(views[:3], lambda r: 0.0) is None


def test_affinity_holds_while_the_sticky_replica_is_not_much_worse():
    a, b = View("a", outstanding_ms=50), View("b", outstanding_ms=0)
    chooser = selector(affinity_slack=1.5)
    chooser.remember("clip", a)
    assert chooser.choose([a, b], lambda r: 100.0, affinity="clip") is a  # 150 <= 1.5 × 100 + 1
    a.outstanding_ms = 60
    assert chooser.choose([a, b], lambda r: 100.0, affinity="clip") is b  # 160 > 151


def test_a_stale_replica_is_probed_once_it_has_served_nothing_for_refresh_s():
    fresh, stale = View("fresh", last_used=99.0), View("stale", outstanding_ms=1e6, last_used=90.0)
    assert selector(refresh_s=5.0).choose([fresh, stale], lambda r: 0.0) is stale


def test_fcfs_goes_round_robin():
    views = [View("a"), View("b"), View("c")]
    chooser = selector(policy="fcfs")
    assert [chooser.choose(views, lambda r: 0.0).address for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_admission_prices_a_request_from_the_views_alone():
    llm = View("llm", costs=LlmCosts(CostSeeds(prefill_ms=10.0, prefill_ms_per_token=0.5, step_ms=20.0)))
    encoder = View("encoder", costs=TokenCost(5.0, 0.01))
    decoder = View("decoder", costs=_Decode())
    controller = Controller(Stage([decoder]), Stage([encoder]), Stage([llm]), defaults=SloDefaults(
        Slo(8000, 100), Slo(3000, 100), Slo(1000, 100)), policy="slo", headroom=1.0)
    ticket = controller.admit(["image"], [MediaShape(1, 1000, 400)], 120, ttft_ms=0, tpot_ms=0,
                              allow_degrade=False, now=0.0)
    assert ticket.decision.admit
    assert ticket.prediction.llm.work_ms == 10.0 + 0.5 * 120
    assert ticket.prediction.media.work_ms == 3.0 + 5.0 + 0.01 * 400
    llm.num_in_flight = 1  # something runs: the stack is not idle, and no probe is due
    assert not controller._idle()


class _Decode:
    """A decoder cost model: 3 ms whatever the frames."""

    def predict(self, num_frames: float, num_pixels: float) -> float:
        return 3.0
