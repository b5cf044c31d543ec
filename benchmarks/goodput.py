"""Goodput benchmark: mmserve against a transformers baseline and against itself in one process.

    python benchmarks/goodput.py [--rates 1,2,4,8,16] [--duration-s 20] [--preset tiny] [--plot goodput.png]

One run, the same mixed traces (videos, images, text; Poisson arrivals at each rate for --duration-s, at least
--requests requests: a fixed count would make the high rates' traces seconds long, too short for an
overloaded system's queue to build, and flatter it) against three systems
that all serve the public `Router/Generate` gRPC API, so one client drives them all:

* mmserve: the disaggregated stack (`stack.launcher`: decoder, encoder, llm and router processes);
* aggregated: the same four stages in one process (`mmserve up --aggregated`);
* transformers: `benchmarks/hf_baseline.py`, one process calling `generate` one request at a time.

The two mmserve systems share one private redis-server (flushed before every run of a rate); each rate gets
media of its own, so no run inherits cached embeddings or KV prefixes from another. SLO targets are the same
for all three: a multiple (--slo-factor) of the slowest system's median lone-request latency per class
(TTFT per class, TPOT overall), so every system meets them when it serves one request at a time and the
figures measure how each holds up under load. A request meets its SLO when its TTFT and TPOT are within
target; refused and failed requests do not. Attainment is over all requests; goodput is requests per second
that met their SLO.

Headline: at R, the highest offered rate at which mmserve keeps at least 90% attainment (the lowest rate if
none), goodput_vs_hf = mmserve's goodput / the baseline's, goodput_vs_aggregated = mmserve's / aggregated's.
The line before it gives each system's highest rate with at least 90% attainment (DistServe's goodput).
Last line: goodput_vs_hf=X goodput_vs_aggregated=Y
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import shlex
import sys
import tempfile

from stack.launcher import Child, Stack, StackSpec
from stack.ports import free_port
from mmserve.models.tiny import build_tiny_model

# A sibling module: the scripts run as `python benchmarks/<name>.py`.
from workload import (LOOSE_SLO_CAPS, failures, flush, highest_rate, lone_latencies, make_media, make_trace, plot, replay,
                      slo_targets, start_redis, start_stack, summarize)

SYSTEMS = ("mmserve", "aggregated", "transformers")
HERE = pathlib.Path(__file__).resolve().parent


def start_process(name: str, argv: list[str], port: int) -> tuple[Stack, str]:
    """A one-process system serving Router/Generate on port, healthy."""
    address = f"127.0.0.1:{port}"
    system = Stack([Child(name, argv, address)])
    system.start()
    asyncio.run(system.wait_healthy(300))
    return system, address


def start_system(name: str, model: str, redis_url: str, router_args: tuple[str, ...]) -> tuple[Stack, str]:
    """Starts one of SYSTEMS (router_args go to both mmserve routers); returns it and its Router address."""
    if name == "mmserve":
        return start_stack(model, redis_url, router_args)
    port = free_port()
    if name == "aggregated":  # `mmserve up --aggregated`, with the router flags `mmserve up` has no option for
        spec = StackSpec(model=model, port=port, redis_url=redis_url, log_level="ERROR",
                         router_args=LOOSE_SLO_CAPS + tuple(router_args))
        code = ("import sys; from stack.aggregated import main_aggregated; from stack.launcher import StackSpec; "
                f"sys.exit(main_aggregated({spec!r}))")
        return start_process(name, [sys.executable, "-c", code], port)
    return start_process(name, [sys.executable, str(HERE / "hf_baseline.py"), "--model", model, "--port", str(port),
                                "--log-level", "ERROR"], port)


def _variants(trace: list[str], reuse: float) -> int:
    """Distinct items per media class so that about `reuse` of a trace's media requests repeat one."""
    most = max(trace.count("video"), trace.count("image"))
    return max(1, round(most * (1 - reuse)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1,2,4,8,16", help="offered request rates (req/s), comma-separated")
    parser.add_argument("--duration-s", type=float, default=20.0, help="length of each rate's trace")
    parser.add_argument("--requests", type=int, default=40, help="fewest requests per rate")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--slo-factor", type=float, default=5.0,
                        help="SLO = factor × the slowest system's lone-request latency")
    parser.add_argument("--slo-floor-ms", type=float, default=200.0,
                        help="smallest TTFT target (a quarter of it for TPOT): below it, timer noise decides")
    parser.add_argument("--mix", default="0.3,0.3,0.4", help="fractions of video, image and text requests")
    parser.add_argument("--reuse", type=float, default=0.5,
                        help="share of media requests that repeat an item seen before in their trace (a video "
                             "asked a new question: mmserve's embedding cache can answer it), the same at every rate")
    parser.add_argument("--preset", default="tiny", help="model: tiny, or qwen2.5-vl-3b-width (real widths)")
    parser.add_argument("--router-args", default="", help="further flags of both mmserve routers, e.g. "
                                                             "'--policy fcfs' (no admission control)")
    parser.add_argument("--plot", default="goodput.png")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]

    workdir = tempfile.mkdtemp(prefix="mmserve-goodput-")
    model = str(build_tiny_model(pathlib.Path(workdir) / "model", seed=0, preset=args.preset))
    mix = [float(x) for x in args.mix.split(",")]
    traces = {rate: make_trace(max(args.requests, int(rate * args.duration_s)), mix) for rate in rates}
    calibration_media = make_media(seed=0)
    media = {rate: make_media(_variants(traces[rate], args.reuse), seed=1 + i) for i, rate in enumerate(rates)}
    load = [os.getloadavg()[0]]  # other work on the machine skews every figure: report how busy it was
    redis, redis_url = start_redis(workdir)
    running: dict[str, tuple[Stack, str]] = {}
    results: dict[str, dict[float, dict[str, float]]] = {name: {} for name in SYSTEMS}
    try:
        # All three stay up (idle but for the one measured) so the targets can come from all three first.
        lone = {}
        for name in SYSTEMS:
            running[name] = start_system(name, model, redis_url, tuple(shlex.split(args.router_args)))
            flush(redis_url)  # no system calibrates on embeddings another one cached
            lone[name] = asyncio.run(lone_latencies(running[name][1], calibration_media, args.max_tokens))
            print(f"{name} lone-request medians (ms): " + ", ".join(f"{k}={v:.0f}" for k, v in lone[name].items()),
                  file=sys.stderr)
        slowest = {key: max(lone[name][key] for name in SYSTEMS) for key in lone["mmserve"]}
        slo = slo_targets(slowest, args.slo_factor, args.slo_floor_ms)
        print("SLO targets (ms): " + ", ".join(f"{k}={v:.0f}" for k, v in slo.items()), file=sys.stderr)
        for name in SYSTEMS:
            for rate in rates:
                flush(redis_url)
                outcomes, wall = asyncio.run(replay(running[name][1], rate, traces[rate], media[rate], slo,
                                                    args.max_tokens, seed=int(rate * 10), salt=f"{name}{rate}"))
                results[name][rate] = summarize(outcomes, slo, wall)
                load.append(os.getloadavg()[0])
                print(f"{name} rate={rate}: " + ", ".join(f"{k}={v:.2f}" for k, v in results[name][rate].items())
                      + f"; failed: {failures(outcomes)}", file=sys.stderr)
    finally:
        for system, _ in running.values():
            system.stop()
        redis.stop()

    print(f"{'system':<13}{'rate':>6}{'attain':>8}{'refused':>9}{'errors':>8}{'goodput':>9}{'p50 ttft':>10}"
          f"{'p90 ttft':>10}")
    for name, by_rate in results.items():
        for rate, r in by_rate.items():
            print(f"{name:<13}{rate:>6.1f}{r['attainment']:>8.2f}{r['refused']:>9.2f}{r['errors']:>8.2f}"
                  f"{r['goodput']:>9.2f}{r['p50_ttft']:>10.0f}{r['p90_ttft']:>10.0f}")
    plot(results, args.plot)
    rate = highest_rate(results["mmserve"]) or rates[0]
    ours = results["mmserve"][rate]["goodput"]
    vs = {name: ours / max(results[name][rate]["goodput"], 1e-9) for name in ("transformers", "aggregated")}
    print("highest rate with >= 90% attainment (req/s): "
          + ", ".join(f"{name}={highest_rate(results[name]):g}" for name in SYSTEMS))
    print(f"{os.cpu_count()} cores; 1-minute load average during the run {min(load):.1f}..{max(load):.1f}")
    print(f"plot: {args.plot}; SLO targets (ms): " + ", ".join(f"{k}={v:.0f}" for k, v in slo.items())
          + f"; mmserve router flags: {args.router_args or 'defaults'}; compared at {rate:g} req/s")
    print(f"goodput_vs_hf={vs['transformers']:.2f} goodput_vs_aggregated={vs['aggregated']:.2f}")


if __name__ == "__main__":
    main()
