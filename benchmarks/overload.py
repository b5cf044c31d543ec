"""Overload benchmark: at 3× the measured capacity, do the requests the router admits still meet their SLO?

    python benchmarks/overload.py [--preset small] [--variants 32] [--duration-s 30] [--factor 3] [--capacity X]

On a stack of its own (separate processes, a random-weight model of --preset's size, a private
redis-server) it calibrates SLO targets from lone requests of each class (as slo.py does) and measures
capacity: completed requests per second of the mixed trace in a closed loop, doubling the clients until
that stops rising (a throughput ceiling, far past where latencies meet any SLO). It then replays a trace of
duration-s with Poisson arrivals at factor × capacity against fresh stacks, each warmed up by a few lone
requests: the SLO-aware router (admission control with its adaptive headroom, bounded queues), the same
with --admission-headroom 0.5, and --policy fcfs (everything admitted, arrival order; only the bounded
queues refuse). Admitted requests are those not refused with RESOURCE_EXHAUSTED; their attainment is the
share that met both TTFT and TPOT targets; goodput is requests per second that met them.
Last line: admitted_attainment_3x=X (the SLO-aware router's).
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import shlex
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
from workload import (build, failures, flush, lone_latencies, make_media, make_trace, met, parse_slo_ms, replay,
                      run_one, slo_targets, start_redis, start_stack)


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


async def saturated_capacity(address: str, mix: list[float], slo, max_tokens: int, variants: int) -> float:
    """The throughput once more clients no longer raise it: 4, 8, 16, ... closed-loop clients, 6 requests each,
    until a doubling adds less than 10 % (a closed loop with too few clients measures the clients, not the stack).
    """
    best = 0.0
    for num_clients in (4, 8, 16, 32, 64, 128):
        rate = await capacity(address, make_trace(6 * num_clients, mix, seed=num_clients),
                              make_media(variants, seed=1), slo, max_tokens, num_clients)
        print(f"  {num_clients} clients: {rate:.2f} req/s", file=sys.stderr)
        if rate < 1.1 * best:
            return max(best, rate)
        best = rate
    return best


def summary(outcomes, slo) -> dict[str, float]:
    """Refusal share, attainment of the admitted requests, TTFT quantiles of those that completed."""
    admitted = [o for o in outcomes if o.code != "RESOURCE_EXHAUSTED"]
    ok = [o.ttft_ms for o in admitted if o.code == "OK"]
    late = [o for o in admitted if o.code == "OK" and not met(o, slo)]
    # The last three quarters of the trace: past the start, where the router's models meet the overload.
    steady = [o for o in outcomes[len(outcomes) // 4:] if o.code != "RESOURCE_EXHAUSTED"]
    return {"refused": 1 - len(admitted) / len(outcomes),
            "admitted_attainment": sum(met(o, slo) for o in admitted) / len(admitted) if admitted else 0.0,
            "steady_attainment": sum(met(o, slo) for o in steady) / len(steady) if steady else 0.0,
            "errors": sum(o.code != "OK" for o in admitted) / len(outcomes),
            # Why admitted requests missed: their first token came late, or the tokens after it did.
            "late_ttft": sum(o.code == "OK" and o.ttft_ms > slo[o.cls] for o in admitted) / max(1, len(admitted)),
            "late_tpot": sum(o.code == "OK" and o.ttft_ms <= slo[o.cls] and o.tpot_ms > slo["tpot"]
                             for o in admitted) / max(1, len(admitted)),
            "p50_ttft": _percentile(ok, 50), "p99_ttft": _percentile(ok, 99),
            # Per class: admitted, late first token, late tokens after it.
            "late_by_class": {cls: (sum(o.cls == cls for o in admitted),
                                    sum(o.cls == cls and o.ttft_ms > slo[cls] for o in late),
                                    sum(o.cls == cls and o.ttft_ms <= slo[cls] for o in late))
                              for cls in ("video", "image", "text")},
            # Where the late ones' time went (medians of the router's timings, ms).
            "late_stages": {k: statistics.median(o.stages.get(k, 0.0) for o in late)
                            for k in ("media_wait_ms", "decode_ms", "encode_ms", "queue_ms", "prefill_ms", "ttft_ms",
                                      "tpot_ms")} if late else {}}


def _percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) >= 2 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=30.0, help="length of the overload trace")
    parser.add_argument("--factor", type=float, default=3.0, help="offered rate = factor × measured capacity")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--slo-factor", type=float, default=5.0, help="SLO = factor × lone-request latency")
    parser.add_argument("--slo-floor-ms", type=float, default=100.0)
    parser.add_argument("--slo-ms", default="", help="fixed targets instead of measured ones, e.g. "
                        "video=2500,image=900,text=136,tpot=53 (to compare two builds whose lone latencies differ)")
    parser.add_argument("--mix", default="0.3,0.3,0.4", help="fractions of video, image and text requests")
    parser.add_argument("--preset", default="tiny", help="model size (mmserve tiny-model --preset)")
    parser.add_argument("--variants", type=int, default=8, help="distinct media per class (fewer: more cache hits)")
    parser.add_argument("--capacity", type=float, default=0.0, help="req/s: skip measuring it (0: measure)")
    parser.add_argument("--router-args", default="", help="more flags of every router (--no-stream-prefill)")
    parser.add_argument("--systems", default="slo,slo-h0.5,fcfs", help="which of the three to run")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="mmserve-overload-")
    model = str(build_tiny_model(pathlib.Path(workdir) / "model", seed=0, preset=args.preset))
    mix = [float(x) for x in args.mix.split(",")]
    # Calibration and capacity on a stack of their own: what a saturated closed loop teaches a router's cost
    # models must not carry into the runs compared (each starts fresh and warms up like a new deployment).
    redis, redis_url = start_redis(workdir)
    more = tuple(shlex.split(args.router_args))
    stack, address = start_stack(model, redis_url, more)
    try:
        if args.slo_ms:
            slo = parse_slo_ms(args.slo_ms)
        else:
            lone = asyncio.run(lone_latencies(address, make_media(seed=0), args.max_tokens))
            slo = slo_targets(lone, args.slo_factor, args.slo_floor_ms)
        print("SLO targets (ms): " + ", ".join(f"{k}={v:.0f}" for k, v in slo.items()), file=sys.stderr)
        # Media like the overload trace's (as many variants, so as many cache hits), but other bytes.
        measured = args.capacity or asyncio.run(saturated_capacity(address, mix, slo, args.max_tokens,
                                                                   args.variants))
    finally:
        stack.stop()
        redis.stop()
    rate = args.factor * measured
    num_requests = int(rate * args.duration_s)
    print(f"capacity {measured:.2f} req/s; offering {rate:.2f} req/s, {num_requests} requests", file=sys.stderr)
    trace = make_trace(num_requests, mix, seed=1)
    results = {}
    systems = {"slo": ("--policy", "slo"), "slo-h0.5": ("--policy", "slo", "--admission-headroom", "0.5"),
               "fcfs": ("--policy", "fcfs")}
    for policy in args.systems.split(","):
        redis, redis_url = start_redis(workdir)
        stack, address = start_stack(model, redis_url, systems[policy] + more)
        try:
            asyncio.run(lone_latencies(address, make_media(seed=0), args.max_tokens))  # a new deployment's first
            flush(redis_url)
            outcomes, wall = asyncio.run(replay(address, rate, trace, make_media(args.variants, seed=2), slo,
                                                args.max_tokens, seed=3, salt=f"overload-{policy}"))
            results[policy] = summary(outcomes, slo) | {"goodput": sum(met(o, slo) for o in outcomes) / wall}
            print(f"{policy}: {results[policy]}; failures: {failures(outcomes)}", file=sys.stderr)
        finally:
            stack.stop()
            redis.stop()

    print(f"capacity {measured:.2f} req/s, offered {rate:.2f} req/s ({args.factor:g}x), {num_requests} requests")
    print(f"{'router':<9}{'refused':>9}{'admitted attain':>17}{'after 1/4':>11}{'late ttft':>11}{'late tpot':>11}"
          f"{'errors':>8}{'goodput':>9}{'p50 ttft ms':>13}{'p99 ttft ms':>13}")
    for policy, r in results.items():
        print(f"{policy:<9}{r['refused']:>9.2f}{r['admitted_attainment']:>17.2f}{r['steady_attainment']:>11.2f}"
              f"{r['late_ttft']:>11.2f}"
              f"{r['late_tpot']:>11.2f}{r['errors']:>8.2f}{r['goodput']:>9.2f}"
              f"{r['p50_ttft']:>13.0f}{r['p99_ttft']:>13.0f}")
    headline = results.get("slo", next(iter(results.values())))  # the slo router's; else the one system run
    print(f"admitted_attainment_{args.factor:g}x={headline['admitted_attainment']:.2f}")


if __name__ == "__main__":
    main()
