"""The restart policy of `mmserve up`: doubling backoff with a cap, reset after a healthy spell, crash-loop cap."""

from __future__ import annotations

import pytest

from stack.supervisor import RestartPolicy, Restarts


def _exit_and_restart(restarts: Restarts, now: float) -> float | None:
    delay = restarts.on_exit(now)
    if delay is not None:
        restarts.on_restart(now + delay)
    return delay


def test_backoff_doubles_up_to_the_cap():
    restarts = Restarts(RestartPolicy(initial_backoff_s=0.5, max_backoff_s=3.0, max_restarts=10), started_at=0.0)
    delays = [_exit_and_restart(restarts, now=float(i)) for i in range(5)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert restarts.num_restarts == 5


def test_a_healthy_spell_resets_the_backoff():
    restarts = Restarts(RestartPolicy(initial_backoff_s=0.5, healthy_reset_s=30.0), started_at=0.0)
    assert _exit_and_restart(restarts, 1.0) == 0.5
    assert _exit_and_restart(restarts, 2.0) == 1.0
    assert _exit_and_restart(restarts, 100.0) == 0.5  # it had run 99 s since its last start


def test_too_many_restarts_within_the_window_is_a_crash_loop():
    restarts = Restarts(RestartPolicy(max_restarts=3, window_s=60.0, max_backoff_s=1.0), started_at=0.0)
    assert all(_exit_and_restart(restarts, float(i)) is not None for i in range(3))
    assert restarts.on_exit(4.0) is None
    # Restarts older than the window no longer count.
    assert restarts.on_exit(70.0) is not None


@pytest.mark.parametrize("fields", [dict(initial_backoff_s=0.0), dict(initial_backoff_s=20.0, max_backoff_s=10.0),
                                    dict(window_s=0.0), dict(max_restarts=-1)])
def test_bad_policies_are_refused(fields):
    with pytest.raises(ValueError):
        RestartPolicy(**fields)
