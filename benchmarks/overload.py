"""Overload benchmark: at 3× the measured capacity, do the requests the router admits still meet their SLO?

    python benchmarks/overload.py [--requests 60] [--factor 3]

Starts the real stack (separate processes, tiny model, a private redis-server), calibrates SLO targets from
lone requests of each class (as slo.py does), then measures capacity: completed requests per second of the
mixed trace in a closed loop, doubling the clients until that stops rising. It then replays the same kind of
trace with Poisson arrivals at factor × capacity with the SLO-aware router (admission control, bounded
queues), the same with --admission-headroom 0.5 (refuse when the predicted TTFT exceeds half the target), and
--policy fcfs (everything admitted, arrival order) as the baseline, each on a fresh stack and cache. Admitted requests are those not refused with RESOURCE_EXHAUSTED; their attainment is the
share that met both TTFT and TPOT targets. Last line: admitted_attainment_3x=X (the SLO-aware router's).
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import statistics
import sys
import tempfile
import time

import mmserve  # noqa: F401  (first: turns gRPC's fork handlers off before grpc loads; see its __init__)
import grpc

from mmserve import rpc
from mmserve.models.tiny import build_tiny_model
from mmserve.v1 import api_pb2_grpc

# A sibling module: the scripts run as `python benchmarks/<name>.py`.
from workload import (build, failures, flush, lone_latencies, make_media, make_trace, met, replay, run_one,
                      slo_targets, start_redis, start_stack)


async def capacity(address: str, trace: list[str], media, slo, max_tokens: int, num_clients: int) -> float:
    """Completed requests per second with num_clients clients each sending its next request at once."""
    pending = iter(enumerate(trace))
    loose = {c: 1e9 for c in slo}  # measuring throughput, not admission: nothing is refused
    async with grpc.aio.insecure_channel(address, options=rpc.message_options(64 << 20)) as channel:
        stub = api_pb2_grpc.RouterStub(channel)

        async def client() -> int:
            done = 0
            for i, cls in pending:
                done += (await run_one(stub, cls, build(cls, i, media, loose, max_tokens, "capacity"))).code == "OK"
            return done

        start = time.perf_counter()
        completed = sum(await asyncio.gather(*(client() for _ in range(num_clients))))
        return completed / (time.perf_counter() - start)


async def saturated_capacity(address: str, mix: list[float], slo, max_tokens: int) -> float:
    """The throughput once more clients no longer raise it: 4, 8, 16, ... closed-loop clients, 6 requests each,
    until a doubling adds less than 10 % (a closed loop with too few clients measures the clients, not the stack).
    """
    best = 0.0
    for num_clients in (4, 8, 16, 32, 64, 128):
        rate = await capacity(address, make_trace(6 * num_clients, mix, seed=num_clients), make_media(seed=1), slo,
                              max_tokens, num_clients)
        print(f"  {num_clients} clients: {rate:.2f} req/s", file=sys.stderr)
        if rate < 1.1 * best:
            return max(best, rate)
        best = rate
    return best


def summary(outcomes, slo) -> dict[str, float]:
    """Refusal share, attainment of the admitted requests, TTFT quantiles of those that completed."""
    admitted = [o for o in outcomes if o.code != "RESOURCE_EXHAUSTED"]
    ok = [o.ttft_ms for o in admitted if o.code == "OK"]
    return {"refused": 1 - len(admitted) / len(outcomes),
            "admitted_attainment": sum(met(o, slo) for o in admitted) / len(admitted) if admitted else 0.0,
            "errors": sum(o.code != "OK" for o in admitted) / len(outcomes),
            # Why admitted requests missed: their first token came late, or the tokens after it did.
            "late_ttft": sum(o.code == "OK" and o.ttft_ms > slo[o.cls] for o in admitted) / max(1, len(admitted)),
            "late_tpot": sum(o.code == "OK" and o.ttft_ms <= slo[o.cls] and o.tpot_ms > slo["tpot"]
                             for o in admitted) / max(1, len(admitted)),
            "p50_ttft": _percentile(ok, 50), "p99_ttft": _percentile(ok, 99)}


def _percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) >= 2 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600, help="requests of the overload trace")
    parser.add_argument("--factor", type=float, default=3.0, help="offered rate = factor × measured capacity")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--slo-factor", type=float, default=5.0, help="SLO = factor × lone-request latency")
    parser.add_argument("--slo-floor-ms", type=float, default=100.0)
    parser.add_argument("--mix", default="0.3,0.3,0.4", help="fractions of video, image and text requests")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="mmserve-overload-")
    model = str(build_tiny_model(pathlib.Path(workdir) / "model", seed=0))
    mix = [float(x) for x in args.mix.split(",")]
    trace = make_trace(args.requests, mix, seed=1)
    results, slo, rate, measured = {}, None, 0.0, 0.0
    systems = {"slo": ("--policy", "slo"), "slo-h0.5": ("--policy", "slo", "--admission-headroom", "0.5"),
               "fcfs": ("--policy", "fcfs")}
    for policy, router_args in systems.items():
        redis, redis_url = start_redis(workdir)
        stack, address = start_stack(model, redis_url, router_args)
        try:
            if slo is None:
                lone = asyncio.run(lone_latencies(address, make_media(seed=0), args.max_tokens))
                slo = slo_targets(lone, args.slo_factor, args.slo_floor_ms)
                print("SLO targets (ms): " + ", ".join(f"{k}={v:.0f}" for k, v in slo.items()), file=sys.stderr)
                # Media like the overload trace's (as many variants, so as many cache hits), but other bytes:
                # the router's in-process cache must not carry them into the replay.
                measured = asyncio.run(saturated_capacity(address, mix, slo, args.max_tokens))
                rate = args.factor * measured
                print(f"capacity {measured:.2f} req/s; offering {rate:.2f} req/s", file=sys.stderr)
            flush(redis_url)
            outcomes, _ = asyncio.run(replay(address, rate, trace, make_media(seed=2), slo, args.max_tokens,
                                             seed=3, salt=f"overload-{policy}"))
            results[policy] = summary(outcomes, slo)
            print(f"{policy}: {results[policy]}; failures: {failures(outcomes)}", file=sys.stderr)
        finally:
            stack.stop()
            redis.stop()

    print(f"capacity {measured:.2f} req/s, offered {rate:.2f} req/s ({args.factor:g}x), {args.requests} requests")
    print(f"{'router':<9}{'refused':>9}{'admitted attain':>17}{'late ttft':>11}{'late tpot':>11}{'errors':>8}"
          f"{'p50 ttft ms':>13}{'p99 ttft ms':>13}")
    for policy, r in results.items():
        print(f"{policy:<9}{r['refused']:>9.2f}{r['admitted_attainment']:>17.2f}{r['late_ttft']:>11.2f}"
              f"{r['late_tpot']:>11.2f}{r['errors']:>8.2f}"
              f"{r['p50_ttft']:>13.0f}{r['p99_ttft']:>13.0f}")
    print(f"admitted_attainment_{args.factor:g}x={results['slo']['admitted_attainment']:.2f}")


if __name__ == "__main__":
    main()
