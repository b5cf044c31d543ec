"""Soak test: a mixed load at 70% of capacity for a long time; memory, fds, shm segments and KV blocks must stay flat.

    .venv/bin/python loadtest/soak.py                          # starts a stack (tiny model), 10 minutes
    .venv/bin/python loadtest/soak.py --duration 3m --rate 1.5
    .venv/bin/python loadtest/soak.py --addr 10.0.0.7:50051 --llm-metrics 10.0.0.7:9102   # a running stack
    .venv/bin/python loadtest/soak.py --addr router.example.com:50051 --tls-ca-file ca.pem --token-file token.txt

Without --rate it measures capacity first (closed-loop clients for --calibrate, completed requests/s) and
offers --load × that with Poisson arrivals. Every --sample seconds it records the RSS and open files of every
service process (decoder workers and other children included), the number of /dev/shm/mmserve-* segments,
and the llm's KV blocks in use and running sequences (its Prometheus endpoint). It prints one row per
series (start, end, max, slope per minute over the run after --warmup, verdict) and exits 1 when a series
grows, 0 when everything is flat. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import glob
import pathlib
import re
import statistics
import sys
import tempfile
import time
import urllib.request

import mmserve  # noqa: F401  (first: turns gRPC's fork handlers off before grpc loads; see its __init__)
import grpc
import psutil

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from loadtest import connection, report, workloads  # noqa: E402
from loadtest.pacing import ArrivalClock  # noqa: E402
from mmserve.v1 import api_pb2_grpc  # noqa: E402

# A series grows when its fitted rise over the judged window exceeds both a share of its level and a floor
# in its own unit: noise and cache warm-up stay below that, a leak of one item per request does not.
_FLOORS = {"rss_mb": 32.0, "fds": 8.0, "shm_segments": 8.0, "kv_blocks_used": 16.0, "running_sequences": 4.0}
_RELATIVE = 0.10


@dataclasses.dataclass
class Target:
    """What is watched: the router address, the service processes (pid → name), the llm metrics endpoints."""

    address: str
    processes: dict[int, str]
    llm_metrics: list[str]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", default="", help="router of a running stack (default: start one with a tiny model)")
    p.add_argument("--model", default="", help="checkpoint for the stack started here (default: a tiny one)")
    p.add_argument("--llm-metrics", default="", help="with --addr: comma-separated host:port of llm metrics")
    p.add_argument("--llm-kv-cache-mb", type=int, default=64,
                   help="KV cache of the llm started here: its pages become resident as blocks are first used, "
                        "so a small pool is all resident before the judged window, a large one looks like growth")
    p.add_argument("--duration", default="10m", help="how long the load runs: 90s, 3m, 1h")
    p.add_argument("--rate", type=float, default=0.0, help="requests/s to offer (default: --load × capacity)")
    p.add_argument("--load", type=float, default=0.7, help="share of the measured capacity offered")
    p.add_argument("--calibrate", default="30s", help="how long capacity is measured")
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients while measuring capacity")
    p.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=0.2, help="share of the run not judged (caches filling)")
    p.add_argument("--workload", default="mixed", help=", ".join(workloads.SHAPES))
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--cache-hit-ratio", type=float, default=0.3)
    p.add_argument("--request-timeout", type=float, default=120.0)
    connection.add_arguments(p)  # TLS and the bearer token of --addr, as `mmserve generate` and run.py
    args = p.parse_args(argv)
    try:
        args.connection = connection.from_args(args)
        if not args.addr and (args.connection.client_tls or args.token_file):
            raise ValueError("--tls*, --token-file: only with --addr (the stack started here is plaintext, "
                             "without tokens)")
        args.duration_s = report.parse_duration(args.duration)
        args.calibrate_s = report.parse_duration(args.calibrate)
        workloads.parse_shape(args.workload)
        if args.rate < 0 or not 0 < args.load <= 1 or args.sample <= 0 or not 0 <= args.warmup < 1:
            raise ValueError("--rate must not be negative, --load in (0, 1], --sample positive, --warmup in [0, 1)")
    except ValueError as err:
        p.error(str(err))
    return args


# Load --------------------------------------------------------------------------------------------------------


class Load:
    """Sends the workload's requests and counts how each ended."""

    def __init__(self, address: str, workload: workloads.SyntheticWorkload, timeout_s: float,
                 via: connection.Connection = connection.Connection()):
        self.channel = via.aio_channel(address, 256 * 1024 * 1024)
        self.metadata = via.metadata
        self.stub = api_pb2_grpc.RouterStub(self.channel)
        self.workload = workload
        self.timeout_s = timeout_s
        self.outcomes: dict[str, int] = {}

    async def one(self) -> str:
        request = workloads.build_request(self.workload.next())
        try:
            async for _ in self.stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata):
                pass
            code = "OK"
        except grpc.aio.AioRpcError as err:
            code = err.code().name
        self.outcomes[code] = self.outcomes.get(code, 0) + 1
        return code

    async def capacity(self, seconds: float, num_clients: int) -> float:
        """Completed requests/s with num_clients clients each sending its next request at once."""
        end = time.monotonic() + seconds
        start = time.monotonic()

        async def client() -> int:
            done = 0
            while time.monotonic() < end:
                done += await self.one() == "OK"
            return done

        completed = sum(await asyncio.gather(*(client() for _ in range(num_clients))))
        return completed / (time.monotonic() - start)

    async def paced(self, rate: float, seconds: float) -> None:
        """Poisson arrivals at rate for seconds; waits for the requests in flight."""
        clock = ArrivalClock(rate, 1, start=time.monotonic())
        end = time.monotonic() + seconds
        tasks: set[asyncio.Task] = set()
        while (delay := clock.wait(time.monotonic())) + time.monotonic() < end:
            await asyncio.sleep(delay)
            task = asyncio.ensure_future(self.one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)


# Samples -----------------------------------------------------------------------------------------------------


def _tree(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def _llm_gauges(endpoint: str) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10).read().decode()
    out = {}
    for key, name in (("kv_blocks_used", "mmserve_llm_kv_blocks_used"),
                      ("running_sequences", "mmserve_llm_running_sequences")):
        match = re.search(rf"^{name} (\S+)$", body, re.M)
        out[key] = float(match.group(1)) if match else 0.0
    return out


def sample(target: Target) -> dict[str, float]:
    """One reading of every series: `rss_mb <service>`, `fds <service>`, shm segments, llm gauges."""
    values: dict[str, float] = {}
    for pid, name in target.processes.items():
        rss = fds = 0.0
        for process in _tree(pid):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                rss += process.memory_info().rss / 2**20
                fds += process.num_fds()
        values[f"rss_mb {name}"], values[f"fds {name}"] = rss, fds
    values["shm_segments"] = float(len(glob.glob("/dev/shm/mmserve-*")))
    for i, endpoint in enumerate(target.llm_metrics):
        for key, value in _llm_gauges(endpoint).items():
            values[f"{key} llm-{i}" if len(target.llm_metrics) > 1 else f"{key} llm"] = value
    return values


async def sample_every(target: Target, seconds: float, into: list[tuple[float, dict[str, float]]]) -> None:
    start = time.monotonic()
    while True:
        reading = await asyncio.to_thread(sample, target)
        into.append((time.monotonic() - start, reading))
        await asyncio.sleep(seconds)


def verdicts(samples: list[tuple[float, dict[str, float]]], warmup: float) -> list[dict]:
    """Per series: start, end, max, least-squares slope per minute after the warm-up, and flat or growing."""
    judged_from = samples[-1][0] * warmup
    rows = []
    for key in samples[0][1]:
        series = [(t, v[key]) for t, v in samples if key in v]
        judged = [(t, v) for t, v in series if t >= judged_from] or series
        times, values = [t / 60 for t, _ in judged], [v for _, v in judged]
        slope = statistics.linear_regression(times, values).slope if len(judged) >= 2 and len(set(times)) > 1 else 0.0
        rise = slope * (times[-1] - times[0])
        floor = _FLOORS[key.split()[0]]
        growing = rise > max(floor, _RELATIVE * statistics.fmean(values))
        rows.append(dict(series=key, start=series[0][1], end=series[-1][1], max=max(v for _, v in series),
                         slope=slope, verdict="growing" if growing else "flat"))
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'series':<28}{'start':>10}{'end':>10}{'max':>10}{'slope/min':>11}  verdict")
    for r in rows:
        print(f"{r['series']:<28}{r['start']:>10.1f}{r['end']:>10.1f}{r['max']:>10.1f}{r['slope']:>11.2f}  "
              f"{r['verdict']}")


# Stack -------------------------------------------------------------------------------------------------------


def start_stack(model: str, kv_cache_mb: int):
    """mmserve's services and a private redis-server, with metrics endpoints; (stack, target)."""
    from stack.launcher import Stack, StackSpec, plan
    from stack.ports import free_port

    if not model:
        from mmserve.models.tiny import build_tiny_model

        model = str(build_tiny_model(pathlib.Path(tempfile.mkdtemp(prefix="mmserve-soak-")) / "model", seed=0))
    planned = plan(StackSpec(model=model, port=free_port(), metrics=True, log_level="WARNING"))
    children, address = planned.children(), planned.router_address
    for child in children:
        if child.name.startswith("llm"):  # argparse: the last occurrence of a flag wins
            child.argv += ["--kv-cache-bytes", str(kv_cache_mb * 2**20)]
    stack = Stack(children)
    stack.start()
    asyncio.run(stack.wait_healthy(300))
    # Redis fills up to its maxmemory by design: watched only through the services that use it.
    processes = {c.process.pid: c.name for c in children if c.name != "redis"}
    llm_metrics = [f"127.0.0.1:{c.metrics_port}" for c in children if c.name.startswith("llm")]
    return stack, Target(address, processes, llm_metrics)


def running_target(args: argparse.Namespace) -> Target:
    """The mmserve service processes on this host (`python -m services.<name>`) and the llm endpoints given."""
    processes = {}
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "-m" in cmdline and (i := cmdline.index("-m")) + 1 < len(cmdline) and \
                cmdline[i + 1].startswith("services."):
            processes[process.info["pid"]] = f"{cmdline[i + 1].removeprefix('services.')}-{process.info['pid']}"
    return Target(args.addr, processes, [e.strip() for e in args.llm_metrics.split(",") if e.strip()])


async def soak(args: argparse.Namespace, target: Target) -> int:
    kinds = [k for k, w in workloads.parse_shape(args.workload).items() if w > 0]
    workload = workloads.SyntheticWorkload(workloads.parse_shape(args.workload), workloads.make_media_bank(kinds),
                                           max_tokens=args.max_tokens, cache_hit_ratio=args.cache_hit_ratio)
    load = Load(target.address, workload, args.request_timeout, args.connection)
    rate = args.rate
    if not rate:
        capacity = await load.capacity(args.calibrate_s, args.clients)
        rate = args.load * capacity
        print(f"capacity {capacity:.2f} req/s; offering {rate:.2f} req/s ({args.load:.0%})", file=sys.stderr)
    load.outcomes.clear()
    samples: list[tuple[float, dict[str, float]]] = []
    sampler = asyncio.ensure_future(sample_every(target, args.sample, samples))
    started = time.monotonic()
    try:
        await load.paced(rate, args.duration_s)
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        await load.channel.close()
    samples.append((time.monotonic() - started, await asyncio.to_thread(sample, target)))  # drained
    wall = time.monotonic() - started
    total = sum(load.outcomes.values())
    print(f"{total} requests in {wall / 60:.1f} min at {rate:.2f} req/s offered: {load.outcomes}; "
          f"{len(samples)} samples of {len(target.processes)} processes")
    rows = verdicts(samples, args.warmup)
    print_table(rows)
    growing = [r["series"] for r in rows if r["verdict"] == "growing"]
    print(f"growing={len(growing)}" + (f" ({', '.join(growing)})" if growing else ""))
    return 1 if growing else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.addr:
        return asyncio.run(soak(args, running_target(args)))
    stack, target = start_stack(args.model, args.llm_kv_cache_mb)
    try:
        return asyncio.run(soak(args, target))
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
