"""Load-test arrival pacing: per-user arrival clocks, the synthetic pacer and trace replay on schedule."""

import random

import numpy as np
import pytest

from loadtest import workloads
from loadtest.pacing import ArrivalClock, SyntheticPacer, TraceSchedule
from tests.unit.test_loadtest_workloads import make_workload


def arrivals(clock, now=0.0, n=5):
    """Arrival times of a user that sends instantly at each arrival."""
    times = []
    for _ in range(n):
        now += clock.wait(now)
        times.append(now)
    return times


def test_constant_arrivals_are_evenly_spaced_and_staggered_across_users():
    users = [ArrivalClock(2.0, 4, arrivals="constant", index=i) for i in range(4)]
    merged = sorted(t for clock in users for t in arrivals(clock))
    assert merged == pytest.approx([i * 0.5 for i in range(20)])


def test_poisson_arrivals_have_the_users_share_of_the_rate():
    clock = ArrivalClock(2.0, 4, arrivals="poisson", rng=random.Random(1))
    times = arrivals(clock, n=4000)
    gaps = np.diff([0.0, *times])
    assert gaps.mean() == pytest.approx(2.0, rel=0.05)  # 4 users / 2 req/s
    assert gaps.std() == pytest.approx(2.0, rel=0.1)  # exponential: std = mean


def test_a_late_user_sends_at_once_and_keeps_its_timeline():
    clock = ArrivalClock(1.0, 1, arrivals="constant")
    assert clock.wait(0.0) == 0.0
    # Busy until 3.5: the arrivals at 1, 2 and 3 go at once, the one at 4 keeps its time.
    assert [clock.wait(3.5) for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(0.5)]


def test_arrival_clock_checks_its_settings():
    for kwargs in ({"rate": 0, "num_users": 1}, {"rate": 1, "num_users": 0}):
        with pytest.raises(ValueError):
            ArrivalClock(**kwargs)
    with pytest.raises(ValueError, match="poisson or constant"):
        ArrivalClock(1.0, 1, arrivals="burst")


def test_synthetic_pacer_pairs_the_users_clock_with_the_shared_workload():
    w = make_workload("text-only", {})
    pacer = SyntheticPacer(w, ArrivalClock(1.0, 2, arrivals="constant", index=1, start=10.0))
    delay, spec = pacer.next(10.0)
    assert delay == pytest.approx(1.0) and spec.kind == "text"


def test_trace_schedule_sends_lines_at_their_offsets_and_repeats_after_span_plus_mean_gap():
    specs = [workloads.RequestSpec("text", str(at), at=at) for at in (3.0, 1.0, 2.0)]
    schedule = TraceSchedule(specs, start=100.0)
    assert schedule.period == pytest.approx(3.0)  # span 2 s + mean gap 1 s
    due = []
    for _ in range(6):
        delay, spec = schedule.next(100.0)
        due.append((delay, spec.prompt))
    assert due == [(1.0, "1.0"), (2.0, "2.0"), (3.0, "3.0"), (4.0, "1.0"), (5.0, "2.0"), (6.0, "3.0")]
    assert schedule.next(200.0)[0] == 0.0  # a line already due goes at once


def test_trace_schedule_of_one_line_repeats_every_second():
    schedule = TraceSchedule([workloads.RequestSpec("text", "x", at=0.5)])
    assert [schedule.next(0.0)[0] for _ in range(3)] == [0.5, 1.5, 2.5]
