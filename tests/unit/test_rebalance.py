"""Role switching policy: a flex replica moves to the backed-up stage only after a sustained imbalance."""

from __future__ import annotations

import pytest

from services.router.rebalance import Move, RoleBalancer, StageLoad


def loads(encoder_ms: float, num_encoders: int, llm_ms: float, num_llms: int) -> dict[str, StageLoad]:
    return {"encoder": StageLoad(encoder_ms, num_encoders), "llm": StageLoad(llm_ms, num_llms)}


def make_balancer(**overrides) -> RoleBalancer:
    return RoleBalancer(**({"ratio": 3.0, "min_backlog_ms": 100.0, "sustain_s": 2.0, "dwell_s": 10.0} | overrides))


def test_a_sustained_encoder_backlog_moves_a_flex_replica_from_the_llm_pool():
    balancer = make_balancer()
    roles = {"flex-a:1": "llm"}
    backed_up = loads(3000, 1, 50, 2)
    assert balancer.decide(0.0, backed_up, roles) is None  # not sustained yet
    assert balancer.decide(1.9, backed_up, roles) is None
    assert balancer.decide(2.0, backed_up, roles) == Move("flex-a:1", "llm", "encoder")


def test_a_passing_burst_does_not_move_anything():
    balancer = make_balancer()
    roles = {"flex-a:1": "llm"}
    assert balancer.decide(0.0, loads(3000, 1, 50, 2), roles) is None
    assert balancer.decide(1.0, loads(60, 1, 50, 2), roles) is None  # balance restored: the clock restarts
    assert balancer.decide(2.5, loads(3000, 1, 50, 2), roles) is None
    assert balancer.decide(4.5, loads(3000, 1, 50, 2), roles) == Move("flex-a:1", "llm", "encoder")


def test_the_llm_stage_gets_a_replica_back_but_not_before_the_dwell_time():
    balancer = make_balancer()
    assert balancer.decide(0.0, loads(3000, 1, 0, 2), {"f:1": "llm"}) is None
    assert balancer.decide(2.0, loads(3000, 1, 0, 2), {"f:1": "llm"}) == Move("f:1", "llm", "encoder")
    now_encoder = {"f:1": "encoder"}
    llm_backed_up = loads(0, 2, 5000, 1)
    assert balancer.decide(3.0, llm_backed_up, now_encoder) is None
    assert balancer.decide(6.0, llm_backed_up, now_encoder) is None  # sustained, but f:1 moved 4 s ago
    assert balancer.decide(12.0, llm_backed_up, now_encoder) == Move("f:1", "encoder", "llm")


def test_small_or_proportionate_backlogs_and_a_last_replica_stay_put():
    balancer = make_balancer(sustain_s=0.0)
    roles = {"f:1": "llm"}
    assert balancer.decide(0.0, loads(90, 1, 0, 2), roles) is None  # under min_backlog_ms
    assert balancer.decide(0.0, loads(3000, 1, 2400, 2), roles) is None  # 3000 vs 1200 per replica: under 3x
    assert balancer.decide(0.0, loads(3000, 1, 0, 1), roles) is None  # the llm stage would be left empty
    assert balancer.decide(0.0, loads(3000, 1, 0, 2), {"f:1": "encoder"}) is None  # no flex replica to take


def test_pressure_is_backlog_per_replica():
    assert StageLoad(3000, 3).pressure_ms == 1000
    assert StageLoad(500, 0).pressure_ms == 500


def test_settings_are_checked():
    with pytest.raises(ValueError, match="ratio"):
        RoleBalancer(ratio=1.0)
