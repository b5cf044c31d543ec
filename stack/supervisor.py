"""When `mmserve up` restarts a child that exited: exponential backoff, reset after a healthy spell, and a cap on
restarts within a window beyond which it gives up (a crash loop). Pure Python: no processes, no clock of its own."""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    """How children that exit unexpectedly are restarted."""

    initial_backoff_s: float = 0.5  # pause before the first restart after a healthy spell
    max_backoff_s: float = 10.0  # the doubling pause never exceeds this
    healthy_reset_s: float = 30.0  # a child that ran this long before exiting restarts with the initial pause again
    max_restarts: int = 5  # restarts of one child within window_s; one more exit than that is a crash loop
    window_s: float = 120.0

    def __post_init__(self):
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("initial_backoff_s: must be positive and at most max_backoff_s")
        if self.max_restarts < 0 or self.window_s <= 0 or self.healthy_reset_s <= 0:
            raise ValueError("max_restarts, window_s, healthy_reset_s: must be positive")


class Restarts:
    """One child's restart history: asked at each exit how long to wait before restarting it, or None to give up."""

    def __init__(self, policy: RestartPolicy, started_at: float):
        self.policy = policy
        self.started_at = started_at
        self.num_restarts = 0
        self._backoff_s = 0.0  # the last pause; 0 before any
        self._recent: collections.deque[float] = collections.deque()  # times of the restarts within the window

    def on_exit(self, now: float) -> float | None:
        """Seconds to wait before restarting the child that exited at now; None when it is crash-looping."""
        while self._recent and now - self._recent[0] > self.policy.window_s:
            self._recent.popleft()
        if len(self._recent) >= self.policy.max_restarts:
            return None
        if self._backoff_s == 0.0 or now - self.started_at >= self.policy.healthy_reset_s:
            self._backoff_s = self.policy.initial_backoff_s
        else:
            self._backoff_s = min(self.policy.max_backoff_s, 2 * self._backoff_s)
        return self._backoff_s

    def on_restart(self, now: float) -> None:
        """Records that the child was started again at now."""
        self.num_restarts += 1
        self.started_at = now
        self._recent.append(now)
