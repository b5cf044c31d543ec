"""Unified replica benchmark: encoder and llm sharing one device, against naive co-location and the split layout.

    python benchmarks/unified.py [--rates 1,2] [--duration-s 20] [--preset tiny] [--cores 0,1]

The same mixed trace (text chats decoding while video and image requests arrive; Poisson arrivals at each rate)
against three layouts of the encoder and the llm on the same cores (--cores, with taskset), each behind its own
decoder and router:

* unified: one `stack.unified` process (both roles, each with its own batcher and scheduler, and the device
  arbiter between them; the router gets it as `--unified-addrs`);
* naive: one `stack.flex` process with both roles serving at once and no arbiter (plain encoder and llm
  addresses to the router);
* split: the disaggregated layout, an encoder process on the first half of the cores and an llm process on the
  other half.

SLO targets are --slo-factor times the slowest layout's median lone-request latency per class (TTFT per class,
TPOT overall): every layout's lone requests are measured first, then each layout replays the traces with every
request carrying those targets, as a client's would (admission, the router's deadlines, the llm's
earliest-deadline order and a unified replica's order of slices and prefill chunks all come from them;
`--loose-targets` sends targets nobody misses instead, and applies the real ones to the outcomes only). A request
meets its SLO when its TTFT and TPOT are within target (refusals and errors do not).
Goodput at 90% attainment: the goodput at the highest rate a layout keeps 90% attainment (0 if none does).
Time per output token of the running decodes (the text chats): p50/p99 per layout at that rate, against the llm
running alone (the same text requests on the unified layout with no media: nothing to arbitrate).
Last line: goodput_vs_best_other=X p99_tpot_vs_llm_alone=Y
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import shlex
import statistics
import sys
import tempfile
import urllib.request

from mmserve.models.tiny import build_tiny_model
from services.decoder.config import DecoderConfig
from services.encoder.config import EncoderConfig
from services.llm.config import LlmConfig
from services.router.config import RouterConfig
from stack.launcher import Child, Stack
from stack.ports import free_port

# A sibling module: the scripts run as `python benchmarks/<name>.py`.
from workload import (CLASSES, failures, flush, highest_rate, lone_latencies, make_media, make_trace, replay,
                      slo_targets, start_redis, summarize)

LAYOUTS = ("unified", "naive", "split")
LOOSE = dict(max_slo_ttft_ms=1e9, max_slo_tpot_ms=1e9)
LOOSE_TARGETS = {c: 1e9 for c in CLASSES} | {"tpot": 1e9}


def _pinned(cores: list[int], argv: list[str]) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cores)), *argv]


def start_layout(layout: str, model: str, redis_url: str, cores: list[int], router_args: list[str],
                 unified_args: list[str]):
    """The layout's processes, healthy; returns the stack and the router address."""
    common = dict(log_level="ERROR")
    ports = {name: free_port() for name in ("decoder", "encoder", "llm", "router")}
    address = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    threads = len(cores) if layout != "split" else max(1, len(cores) // 2)
    encoder = EncoderConfig(port=ports["encoder"], model=model, redis_url=redis_url, num_threads=threads, **common)
    # The unified replica's one metrics registry (both roles and the arbiter) on the llm's port.
    metrics_port = free_port() if layout == "unified" else 0
    llm = LlmConfig(port=ports["llm"], model=model, num_threads=threads, metrics_port=metrics_port, **common)
    children = [Child("decoder", [sys.executable, "-m", "services.decoder",
                                  *DecoderConfig(port=ports["decoder"], **common).to_argv()], address["decoder"])]
    pair = ["--encoder-args", shlex.join(encoder.to_argv()), "--llm-args", shlex.join(llm.to_argv())]
    if layout == "split":
        half = len(cores) // 2 or 1
        children += [Child("encoder", _pinned(cores[:half], [sys.executable, "-m", "services.encoder",
                                                             *encoder.to_argv()]), address["encoder"]),
                     Child("llm", _pinned(cores[half:] or cores, [sys.executable, "-m", "services.llm",
                                                                  *llm.to_argv()]), address["llm"])]
    else:
        entry = ["stack.unified", *unified_args] if layout == "unified" else ["stack.flex"]
        children.append(Child(layout, _pinned(cores, [sys.executable, "-m", *entry, *pair]), address["llm"]))
    stages = (dict(unified_addrs=f"{address['encoder']}/{address['llm']}") if layout == "unified"
              else dict(encoder_addrs=address["encoder"], llm_addrs=address["llm"]))
    router = RouterConfig(port=ports["router"], model=model, redis_url=redis_url, decoder_addrs=address["decoder"],
                          **stages, **LOOSE, **common).with_flags(router_args)
    children.append(Child("router", [sys.executable, "-m", "services.router", *router.to_argv()], address["router"]))
    stack = Stack(children)
    stack.start()
    asyncio.run(stack.wait_healthy(300))
    return stack, address["router"], metrics_port


def arbiter_counters(metrics_port: int) -> dict[str, float]:
    """The unified replica's arbiter counters now: device seconds per role, slices deferred, encoder waits."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    wanted = {'mmserve_unified_device_seconds_total{role="llm"}': "llm_s",
              'mmserve_unified_device_seconds_total{role="encoder"}': "encoder_s",
              "mmserve_unified_slices_deferred_total": "deferred",
              'mmserve_unified_device_wait_seconds_sum{role="encoder"}': "encoder_wait_s",
              'mmserve_unified_device_wait_seconds_count{role="encoder"}': "slices"}
    found = dict.fromkeys(wanted.values(), 0.0)
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            found[wanted[name]] = float(value)
    return found


def print_arbiter(rate: float, before: dict[str, float], after: dict[str, float]) -> None:
    """What the arbiter did during one rate's trace (the diagnosis of a starving encoder reads here)."""
    d = {k: after[k] - before[k] for k in after}
    print(f"unified arbiter at {rate:g} req/s: device s llm={d['llm_s']:.1f} encoder={d['encoder_s']:.1f}; "
          f"slices {d['slices']:.0f}, deferred {d['deferred']:.0f} times; mean encoder wait "
          f"{1e3 * d['encoder_wait_s'] / max(d['slices'], 1):.0f} ms", file=sys.stderr)


def tpot_quantiles(outcomes) -> tuple[float, float]:
    """p50 and p99 time per output token of the completed text chats (the running decodes)."""
    values = sorted(o.tpot_ms for o in outcomes if o.cls == "text" and o.code == "OK")
    if len(values) < 2:
        return float("nan"), float("nan")
    return statistics.median(values), statistics.quantiles(values, n=100)[-1]


def ttft_by_class(outcomes) -> dict[str, float]:
    return {cls: statistics.median([o.ttft_ms for o in outcomes if o.cls == cls and o.code == "OK"] or [float("nan")])
            for cls in CLASSES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1,2", help="offered request rates (req/s), comma-separated")
    parser.add_argument("--duration-s", type=float, default=20.0, help="length of each rate's trace")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--mix", default="0.2,0.3,0.5", help="fractions of video, image and text requests")
    parser.add_argument("--slo-factor", type=float, default=5.0, help="SLO = factor × the slowest lone latency")
    parser.add_argument("--slo-floor-ms", type=float, default=200.0, help="smallest TTFT target (TPOT: a quarter)")
    parser.add_argument("--preset", default="tiny", help="model preset (mmserve tiny-model --preset)")
    parser.add_argument("--cores", default=",".join(map(str, sorted(os.sched_getaffinity(0)))),
                        help="the cores every layout's encoder and llm get (split: halves)")
    parser.add_argument("--router-args", default="", help="further flags of every router")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="which layouts to run (the comparison and "
                                                                      "the last line need all three)")
    parser.add_argument("--loose-targets", action="store_true",
                        help="requests carry targets nobody misses (the real ones judge the outcomes only)")
    parser.add_argument("--unified-args", default="", help="the unified replica's arbiter flags, e.g. "
                                                           "'--overlap-threads 1' (python -m stack.unified --help)")
    args = parser.parse_args()
    layouts = args.layouts.split(",")
    rates = [float(r) for r in args.rates.split(",")]
    cores = [int(c) for c in args.cores.split(",")]

    workdir = tempfile.mkdtemp(prefix="mmserve-unified-")
    model = str(build_tiny_model(pathlib.Path(workdir) / "model", seed=0, preset=args.preset))
    mix = [float(x) for x in args.mix.split(",")]
    traces = {rate: make_trace(max(10, int(rate * args.duration_s)), mix) for rate in rates}
    media = {rate: make_media(8, seed=1 + i) for i, rate in enumerate(rates)}
    load = [os.getloadavg()[0]]  # other work on the machine skews every figure: report how busy it was
    redis, redis_url = start_redis(workdir)
    results, outcomes_of, lone = {}, {}, {}

    def started(layout: str):
        return start_layout(layout, model, redis_url, cores, shlex.split(args.router_args),
                            shlex.split(args.unified_args))

    try:
        for layout in layouts:  # one layout up at a time: they share the cores
            stack, address, _ = started(layout)
            try:
                flush(redis_url)
                lone[layout] = asyncio.run(lone_latencies(address, make_media(4, seed=0), args.max_tokens))
            finally:
                stack.stop()
            print(f"{layout} lone-request medians (ms): " + ", ".join(f"{k}={v:.0f}" for k, v in lone[layout].items()),
                  file=sys.stderr)
        # Targets from the slowest layout's lone latencies: every layout is held to the same.
        slowest = {key: max(lone[layout][key] for layout in layouts) for key in lone[layouts[0]]}
        slo = slo_targets(slowest, args.slo_factor, args.slo_floor_ms)
        asked = LOOSE_TARGETS if args.loose_targets else slo
        for layout in layouts:
            stack, address, metrics_port = started(layout)
            try:
                flush(redis_url)  # a fresh router warmed up as the first pass's was: lone requests of each class
                asyncio.run(lone_latencies(address, make_media(4, seed=0), args.max_tokens))
                if layout == "unified":  # the running decodes with the device to themselves
                    texts = {rate: ["text"] * trace.count("text") for rate, trace in traces.items()}
                    alone = {rate: asyncio.run(replay(address, rate * mix[2] / sum(mix), texts[rate], media[rate],
                                                      asked, args.max_tokens, seed=7, salt=f"alone{rate}"))[0]
                             for rate in rates}
                outcomes_of[layout] = {}
                for rate in rates:
                    flush(redis_url)
                    before = arbiter_counters(metrics_port) if metrics_port else {}
                    outcomes_of[layout][rate] = asyncio.run(replay(
                        address, rate, traces[rate], media[rate], asked,
                        args.max_tokens, seed=int(rate * 10), salt=f"{layout}{rate}"))
                    load.append(os.getloadavg()[0])
                    if metrics_port:
                        print_arbiter(rate, before, arbiter_counters(metrics_port))
            finally:
                stack.stop()
    finally:
        redis.stop()
    for layout in layouts:
        results[layout] = {rate: summarize(o, slo, wall) for rate, (o, wall) in outcomes_of[layout].items()}
    print(f"{'layout':<9}{'rate':>6}{'attain':>8}{'goodput':>9}{'tpot p50':>10}{'tpot p99':>10}"
          + "".join(f"{'ttft ' + c:>12}" for c in CLASSES) + "  failed")
    for layout in layouts:
        for rate, (o, _) in outcomes_of[layout].items():
            r, (p50, p99), ttft = results[layout][rate], tpot_quantiles(o), ttft_by_class(o)
            print(f"{layout:<9}{rate:>6.1f}{r['attainment']:>8.2f}{r['goodput']:>9.2f}{p50:>10.1f}{p99:>10.1f}"
                  + "".join(f"{ttft[c]:>12.0f}" for c in CLASSES) + f"  {failures(o)}")
    if set(layouts) != set(LAYOUTS):
        return
    goodput = {layout: results[layout][highest_rate(results[layout])]["goodput"] if highest_rate(results[layout])
               else 0.0 for layout in LAYOUTS}
    rate = highest_rate(results["unified"]) or rates[0]
    p99_unified = tpot_quantiles(outcomes_of["unified"][rate][0])[1]
    p99_alone = tpot_quantiles(alone[rate])[1]
    best_other = max(goodput["naive"], goodput["split"])
    print("goodput at 90% attainment (req/s): " + ", ".join(f"{k}={v:.2f}" for k, v in goodput.items())
          + f"; llm alone at {rate:g} req/s: p99 tpot {p99_alone:.1f} ms")
    print(f"cores {args.cores}; 1-minute load average during the run {min(load):.1f}..{max(load):.1f}; "
          "SLO targets (ms): " + ", ".join(f"{k}={v:.0f}" for k, v in slo.items())
          + f"; unified flags: {args.unified_args or 'defaults'}"
          + ("; requests carried loose targets" if args.loose_targets else ""))
    print(f"goodput_vs_best_other={goodput['unified'] / max(best_other, 1e-9):.2f} "
          f"p99_tpot_vs_llm_alone={p99_unified / p99_alone:.2f}")


if __name__ == "__main__":
    main()
