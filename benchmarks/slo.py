"""SLO benchmark: the SLO-aware router against first-come-first-served round-robin on the same stack.

    python benchmarks/slo.py [--rates 1,2,4,8] [--duration-s 20] [--preset small] [--plot slo.png]

Both runs start the real stack (separate processes, a random-weight model of --preset's size, a private
redis-server), warm it up with a few lone requests of each class (as a new deployment's first users would),
and replay the same mixed trace (videos, images, text) with Poisson arrivals at each rate, for duration-s
each; only the router's --policy differs. SLO targets are calibrated first from lone requests of each
class (a multiple of their latency), so the figures mean the same on fast and slow machines, and every
request carries its targets. A request meets its SLO when its TTFT and TPOT are within target; refused ones do not. Each
rate gets media of its own (and a cold Redis), so no rate inherits another's cached embeddings or KV.

Goodput is requests per second that met their SLO. The headline compares goodput at the highest rate
where the SLO-aware router still keeps 90% attainment of the requests it admits (its promise: what it
accepts meets the SLO); the table also gives each policy's highest rate with 90% attainment of all requests.
Last line: goodput_vs_fcfs=X
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import shlex
import sys
import tempfile

from mmserve.models.tiny import build_tiny_model

# A sibling module: the scripts run as `python benchmarks/<name>.py`.
from workload import (failures, flush, highest_rate, lone_latencies, make_media, make_trace, parse_slo_ms, plot, replay,
                      slo_targets, start_redis, start_stack, summarize)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1,2,4,8", help="offered request rates (req/s), comma-separated")
    parser.add_argument("--duration-s", type=float, default=20.0, help="length of each rate's trace")
    parser.add_argument("--min-requests", type=int, default=40, help="fewest requests per rate")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--slo-factor", type=float, default=5.0, help="SLO = factor × lone-request latency")
    parser.add_argument("--slo-floor-ms", type=float, default=100.0,
                        help="smallest TTFT target (a quarter of it for TPOT): below it, timer noise decides")
    parser.add_argument("--mix", default="0.3,0.3,0.4", help="fractions of video, image and text requests")
    parser.add_argument("--preset", default="tiny", help="model size (mmserve tiny-model --preset)")
    parser.add_argument("--variants", type=int, default=8, help="distinct media per class (fewer: more cache hits)")
    parser.add_argument("--plot", default="slo.png")
    parser.add_argument("--router-args", default="", help="more router flags for both policies (--no-stream-prefill)")
    parser.add_argument("--slo-ms", default="", help="fixed targets instead of measured ones, e.g. "
                        "video=2727,image=981,text=112,tpot=55 (runs on different days then compare)")
    parser.add_argument("--policies", default="slo,fcfs", help="which routers to run (the last line needs both)")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]

    workdir = tempfile.mkdtemp(prefix="mmserve-slo-")
    model = str(build_tiny_model(pathlib.Path(workdir) / "model", seed=0, preset=args.preset))
    calibration_media = make_media(seed=0)
    media = {rate: make_media(args.variants, seed=1 + i) for i, rate in enumerate(rates)}
    mix = [float(x) for x in args.mix.split(",")]
    traces = {rate: make_trace(max(args.min_requests, int(rate * args.duration_s)), mix) for rate in rates}
    results: dict[str, dict[float, dict[str, float]]] = {}
    slo = parse_slo_ms(args.slo_ms) if args.slo_ms else None
    for policy in args.policies.split(","):
        redis, redis_url = start_redis(workdir)  # a fresh cache per policy: neither inherits the other's hits
        stack, address = start_stack(model, redis_url, ("--policy", policy, *shlex.split(args.router_args)))
        try:
            lone = asyncio.run(lone_latencies(address, calibration_media, args.max_tokens))  # warm-up, both
            if slo is None:
                slo = slo_targets(lone, args.slo_factor, args.slo_floor_ms)
                print("SLO targets (ms): " + ", ".join(f"{k}={v:.0f}" for k, v in slo.items()), file=sys.stderr)
            results[policy] = {}
            for rate in rates:
                flush(redis_url)
                outcomes, wall = asyncio.run(replay(address, rate, traces[rate], media[rate], slo, args.max_tokens,
                                                    seed=int(rate), salt=f"{policy}{rate}"))
                results[policy][rate] = summarize(outcomes, slo, wall)
                print(f"{policy} rate={rate}: {results[policy][rate]}; failures: {failures(outcomes)}", file=sys.stderr)
        finally:
            stack.stop()
            redis.stop()

    print(f"{'policy':<6}{'rate':>6}{'attain':>8}{'admitted':>10}{'refused':>9}{'goodput':>9}"
          f"{'p90 ttft text':>15}{'p90 ttft image':>16}")
    for policy, by_rate in results.items():
        for rate, r in by_rate.items():
            print(f"{policy:<6}{rate:>6.1f}{r['attainment']:>8.2f}{r['admitted_attainment']:>10.2f}"
                  f"{r['refused']:>9.2f}{r['goodput']:>9.2f}{r['p90_ttft_text']:>15.0f}{r['p90_ttft_image']:>16.0f}")
    if set(results) != {"slo", "fcfs"}:
        return
    plot(results, args.plot)
    # The highest rate at which the SLO-aware router keeps its promise to 90% of what it admits.
    kept = [r for r in rates if results["slo"][r]["admitted_attainment"] >= 0.9] or rates[:1]
    rate = max(kept)
    ratio = results["slo"][rate]["goodput"] / max(results["fcfs"][rate]["goodput"], 1e-9)
    print("highest rate with >= 90% attainment of all requests (req/s): "
          + ", ".join(f"{policy}={highest_rate(by_rate):g}" for policy, by_rate in results.items()))
    print(f"plot: {args.plot}; compared at {rate} req/s")
    print(f"goodput_vs_fcfs={ratio:.2f}")


if __name__ == "__main__":
    main()
