"""Locust entry point for mmserve: `locust -f loadtest/locustfile.py --host 127.0.0.1:50051 --workload mixed --rate 2`.

Each user paces itself (its wait_time): with -u N users and --rate R, a user offers R / N requests/s,
Poisson (default) or evenly spaced (--arrivals constant), so the N users together offer R requests/s.
A trace workload (--workload trace:<path>) sends each line at its own offset instead and ignores --rate.
"""

from __future__ import annotations

import itertools
import logging
import pathlib
import sys
import time

# Locust imports this file by path; the repository root makes `loadtest` importable from any directory.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import gevent  # noqa: E402
from locust import events, task  # noqa: E402

from loadtest import connection, workloads  # noqa: E402
from loadtest.grpc_user import GrpcUser  # noqa: E402
from loadtest.pacing import ARRIVALS, ArrivalClock, SyntheticPacer, TraceSchedule  # noqa: E402

log = logging.getLogger(__name__)
TRACE_PREFIX = "trace:"


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    group = parser.add_argument_group("mmserve")
    group.add_argument("--workload", default="mixed",
                       help=f"{', '.join(workloads.SHAPES)} or {TRACE_PREFIX}<path to a JSONL trace>")
    group.add_argument("--max-tokens", type=int, default=64,
                       help="tokens each synthetic request generates (max_tokens = min_tokens)")
    group.add_argument("--rate", type=float, default=2.0, help="requests/s offered by all users together")
    group.add_argument("--arrivals", choices=ARRIVALS, default="poisson", help="gaps between a user's requests")
    group.add_argument("--cache-hit-ratio", type=float, default=0.0,
                       help="share of synthetic requests that repeat an earlier one (its media and prompt)")
    group.add_argument("--request-timeout", type=float, default=120.0, help="deadline of each request, seconds")
    connection.add_arguments(group)  # TLS and the bearer token, as `mmserve generate`


class _Shared:
    """What the users of this process share: the synthetic workload or the trace schedule."""

    workload: workloads.SyntheticWorkload | None = None
    trace: TraceSchedule | None = None
    user_index = itertools.count()


@events.init.add_listener
def setup(environment, **_kwargs) -> None:
    """Builds the workload once per Locust process (synthetic media included); exits on a bad option."""
    options = environment.parsed_options
    if options is None:
        return
    try:
        if options.rate <= 0 or options.request_timeout <= 0:
            raise ValueError("--rate and --request-timeout must be positive")
        MmserveUser.connection = connection.from_args(options)  # files read once per process, before any user
        if options.workload.startswith(TRACE_PREFIX):
            _Shared.trace = TraceSchedule(workloads.load_trace(options.workload[len(TRACE_PREFIX):]))
            return
        weights = workloads.parse_shape(options.workload)
        started = time.perf_counter()
        bank = workloads.make_media_bank(k for k, w in weights.items() if w > 0)
        log.info("generated %d media samples in %.1f s", sum(map(len, bank.values())), time.perf_counter() - started)
        _Shared.workload = workloads.SyntheticWorkload(weights, bank, max_tokens=options.max_tokens,
                                                       cache_hit_ratio=options.cache_hit_ratio)
    except (ValueError, OSError) as err:
        raise SystemExit(f"locustfile: {err}") from None
    finally:
        # gevent's clock stood still while this blocked; Locust's --run-time timer is set from it next.
        gevent.get_hub().loop.update_now()


@events.test_start.add_listener
def start_trace(environment, **_kwargs) -> None:
    if _Shared.trace is not None:
        _Shared.trace.start = time.monotonic()


class MmserveUser(GrpcUser):
    """Sends the workload's requests at the pacer's arrival times."""

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.request_timeout_s = options.request_timeout
        self.pending: workloads.RequestSpec | None = None
        if _Shared.trace is not None:
            self.pacer = _Shared.trace
        else:
            clock = ArrivalClock(options.rate, options.num_users or 1, arrivals=options.arrivals,
                                 index=next(_Shared.user_index), start=time.monotonic())
            self.pacer = SyntheticPacer(_Shared.workload, clock)

    def wait_time(self) -> float:
        delay, self.pending = self.pacer.next(time.monotonic())
        return delay

    @task
    def send(self) -> None:
        # Locust runs a task before the first wait: that call only starts the pacing.
        if self.pending is None:
            return
        spec, self.pending = self.pending, None
        self.generate(spec.kind, workloads.build_request(spec))
