"""When each Locust user sends its next request: Poisson or evenly spaced arrivals, or a trace's offsets."""

from __future__ import annotations

import random
from collections.abc import Sequence

from loadtest.workloads import RequestSpec, SyntheticWorkload

ARRIVALS = ("poisson", "constant")


class ArrivalClock:
    """Arrival times of one user out of num_users that together offer rate requests/s.

    Poisson: exponential gaps of mean num_users / rate, so the users' arrivals merge into one Poisson
    process of the full rate. Constant: one request every num_users / rate seconds, the users staggered
    by 1 / rate. Times lie on a fixed timeline from start: a user whose request outlasts its next
    arrival sends the late one at once, so the offered rate holds while any user is free.
    """

    def __init__(self, rate: float, num_users: int, *, arrivals: str = "poisson", index: int = 0,
                 start: float = 0.0, rng: random.Random | None = None):
        if rate <= 0:
            raise ValueError("rate: must be positive")
        if num_users < 1:
            raise ValueError("num_users: must be at least 1")
        if arrivals not in ARRIVALS:
            raise ValueError(f"arrivals: expected {' or '.join(ARRIVALS)}")
        self.mean_gap = num_users / rate
        self.is_poisson = arrivals == "poisson"
        self.rng = rng or random.Random()
        offset = (index % num_users) / rate
        self.next_at = start + (self._gap() if self.is_poisson else offset)

    def _gap(self) -> float:
        return self.rng.expovariate(1.0 / self.mean_gap) if self.is_poisson else self.mean_gap

    def wait(self, now: float) -> float:
        """Seconds from now to this user's next arrival; the arrival after it is scheduled."""
        delay = max(0.0, self.next_at - now)
        self.next_at += self._gap()
        return delay


class SyntheticPacer:
    """One user's arrivals (its own clock) over a workload the process's users share."""

    def __init__(self, workload: SyntheticWorkload, clock: ArrivalClock):
        self.workload = workload
        self.clock = clock

    def next(self, now: float) -> tuple[float, RequestSpec]:
        """Seconds to wait and the request to send then."""
        return self.clock.wait(now), self.workload.next()


class TraceSchedule:
    """A trace replayed in a loop from start: repeat k sends each line at start + k * period + line.at.

    The period is the trace's span plus its mean gap, so the first line of a repeat follows the last line
    of the one before as the lines follow each other. The process's users take lines in turn.
    """

    def __init__(self, requests: Sequence[RequestSpec], start: float = 0.0):
        if not requests:
            raise ValueError("trace: no requests")
        self.requests = sorted(requests, key=lambda r: r.at)
        first, last = self.requests[0].at, self.requests[-1].at
        n = len(self.requests)
        self.period = (last - first) + ((last - first) / (n - 1) if n > 1 and last > first else 1.0)
        self.start = start
        self.num_taken = 0

    def next(self, now: float) -> tuple[float, RequestSpec]:
        """Seconds to wait and the next line of the trace to send then."""
        repeat, i = divmod(self.num_taken, len(self.requests))
        self.num_taken += 1
        spec = self.requests[i]
        return max(0.0, self.start + repeat * self.period + spec.at - now), spec
