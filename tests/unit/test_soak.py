"""The soak test's verdicts: a steady series with noise is flat, a leak is growing, warm-up is not judged."""

from __future__ import annotations

import random
from collections.abc import Callable

from loadtest.soak import parse_args, verdicts


def _samples(series: dict[str, Callable[[float], float]], minutes: float = 10, every_s: float = 5) -> list[tuple[float, dict]]:
    return [(t, {key: f(t / 60) for key, f in series.items()}) for t in
            (i * every_s for i in range(int(minutes * 60 / every_s) + 1))]


def _verdict(samples, key: str, warmup: float = 0.2) -> str:
    return next(r["verdict"] for r in verdicts(samples, warmup) if r["series"] == key)


def test_noise_around_a_level_is_flat():
    rng = random.Random(0)
    samples = _samples({"rss_mb router": lambda m: 400 + rng.uniform(-20, 20),
                        "kv_blocks_used llm": lambda m: rng.randrange(0, 64),
                        "fds llm": lambda m: 40 + rng.randrange(0, 4)})
    assert {r["verdict"] for r in verdicts(samples, 0.2)} == {"flat"}


def test_a_leak_grows():
    samples = _samples({"rss_mb decoder": lambda m: 300 + 12 * m, "shm_segments": lambda m: 2 + 3 * m,
                        "fds encoder": lambda m: 30 + 2 * m})
    assert {r["verdict"] for r in verdicts(samples, 0.2)} == {"growing"}


def test_warm_up_growth_is_not_judged():
    # A cache that fills in the first minute, then stays: growing only if the warm-up were judged.
    samples = _samples({"rss_mb router": lambda m: 300 + 200 * min(m, 1.0)})
    assert _verdict(samples, "rss_mb router", warmup=0.2) == "flat"
    assert _verdict(samples, "rss_mb router", warmup=0.0) == "growing"


def test_the_summary_reports_start_end_and_max():
    row = verdicts(_samples({"fds router": lambda m: 50 - m}), 0.2)[0]
    assert (row["start"], row["end"], row["max"]) == (50, 40, 50)


def test_durations_parse():
    assert parse_args(["--duration", "2m", "--calibrate", "20s"]).duration_s == 120
