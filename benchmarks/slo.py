"""SLO benchmark: the SLO-aware router against first-come-first-served round-robin on the same stack.

    python benchmarks/slo.py [--rates 1,2,4,8] [--requests 40] [--plot slo.png]

Both runs start the real stack (separate processes, tiny model, a private redis-server) and replay the
same mixed trace (videos, images, text) with Poisson arrivals at each rate; only the router's --policy
differs. SLO targets are calibrated first from lone requests of each class (a multiple of their
latency), so the figures mean the same on fast and slow machines, and every request carries its
targets. A request meets its SLO when its TTFT and TPOT are within target; refused ones do not.

Goodput is requests per second that met their SLO. The headline compares goodput at the highest rate
where the SLO-aware router still keeps 90% attainment of the requests it admits.
Last line: goodput_vs_fcfs=X
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import pathlib
import random
import statistics
import sys
import tempfile
import time

import grpc

from mmserve import rpc
from mmserve.launcher import Stack, StackSpec, free_port, plan
from mmserve.media.samples import make_image, make_video
from mmserve.models.tiny import build_tiny_model
from mmserve.v1 import api_pb2, api_pb2_grpc

CLASSES = ("video", "image", "text")


@dataclasses.dataclass
class Outcome:
    cls: str
    code: str  # "OK" or the gRPC status name
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0


def make_media(num_variants: int = 8) -> dict[str, list[bytes]]:
    """A few distinct clips and pictures, so the embedding cache does not answer everything."""
    return {"video": [make_video(seconds=2.0, fps=10, width=224, height=168, seed=i) for i in range(num_variants)],
            "image": [make_image(width=336, height=252, seed=i) for i in range(num_variants)]}


def build(cls: str, i: int, media: dict[str, list[bytes]], slo: dict[str, float], max_tokens: int,
          salt: str) -> api_pb2.GenerateRequest:
    parts = []
    if cls != "text":
        data = media[cls][i % len(media[cls])]
        parts.append(api_pb2.Part(**{cls: api_pb2.Media(data=data)}))
    parts.append(api_pb2.Part(text=f"{salt} request {i}: describe it in detail."))
    return api_pb2.GenerateRequest(
        messages=[api_pb2.Message(role="user", parts=parts)],
        sampling=api_pb2.SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0),
        slo=api_pb2.Slo(ttft_ms=int(slo[cls]), tpot_ms=int(slo["tpot"])))


async def run_one(stub, cls: str, request: api_pb2.GenerateRequest) -> Outcome:
    start = time.perf_counter()
    first = None
    tokens = 0
    try:
        async for reply in stub.Generate(request, timeout=120):
            if reply.WhichOneof("event") == "delta":
                first = first or time.perf_counter()
                tokens += len(reply.delta.token_ids)
        end = time.perf_counter()
    except grpc.aio.AioRpcError as err:
        return Outcome(cls, err.code().name)
    ttft = ((first or end) - start) * 1e3
    return Outcome(cls, "OK", ttft, (end - first) * 1e3 / max(1, tokens - 1) if first else 0.0)


def met(o: Outcome, slo: dict[str, float]) -> bool:
    return o.code == "OK" and o.ttft_ms <= slo[o.cls] and o.tpot_ms <= slo["tpot"]


async def replay(address: str, rate: float, trace: list[str], media, slo, max_tokens: int, seed: int,
                 salt: str) -> tuple[list[Outcome], float]:
    """Sends the trace with Poisson arrivals at rate; returns the outcomes and the wall time."""
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(address, options=rpc.message_options(64 << 20)) as channel:
        stub = api_pb2_grpc.RouterStub(channel)
        start = time.perf_counter()
        tasks = []
        for i, cls in enumerate(trace):
            tasks.append(asyncio.ensure_future(run_one(stub, cls, build(cls, i, media, slo, max_tokens, salt))))
            await asyncio.sleep(rng.expovariate(rate))
        outcomes = await asyncio.gather(*tasks)
        return list(outcomes), time.perf_counter() - start


async def calibrate(address: str, media, max_tokens: int, factor: float, floor_ms: float) -> dict[str, float]:
    """SLO targets: factor times the median lone-request TTFT of each class (TPOT likewise), with a floor."""
    ttft: dict[str, list[float]] = {c: [] for c in CLASSES}
    tpot: list[float] = []
    loose = {c: 1e9 for c in CLASSES} | {"tpot": 1e9}
    async with grpc.aio.insecure_channel(address, options=rpc.message_options(64 << 20)) as channel:
        stub = api_pb2_grpc.RouterStub(channel)
        for round_ in range(4):
            for cls in CLASSES:
                o = await run_one(stub, cls, build(cls, round_, media, loose, max_tokens, f"calibrate{round_}"))
                assert o.code == "OK", o
                if round_:  # the first round warms caches and lazy paths
                    ttft[cls].append(o.ttft_ms)
                    tpot.append(o.tpot_ms)
    targets = {c: max(floor_ms, factor * statistics.median(v)) for c, v in ttft.items()}
    return targets | {"tpot": max(floor_ms / 4, factor * statistics.median(tpot))}


def start_stack(model: str, redis_url: str, policy: str) -> tuple[Stack, str]:
    spec = StackSpec(model=model, port=free_port(), redis_url=redis_url, log_level="ERROR",
                     router_args=("--policy", policy))
    children, address = plan(spec)
    stack = Stack(children)
    stack.start()
    asyncio.run(stack.wait_healthy(300))
    return stack, address


def start_redis(workdir: str) -> tuple[Stack, str]:
    import shutil

    from mmserve.launcher import Child, redis_server_argv

    port = free_port()
    redis = Stack([Child("redis", redis_server_argv(shutil.which("redis-server"), "127.0.0.1", port,
                                                    maxmemory="512mb", workdir=workdir), None)])
    redis.start()
    time.sleep(0.5)
    return redis, f"redis://127.0.0.1:{port}/0"


def flush(redis_url: str) -> None:
    import redis

    redis.Redis.from_url(redis_url).flushall()


def summarize(outcomes: list[Outcome], slo, wall_s: float) -> dict[str, float]:
    admitted = [o for o in outcomes if o.code != "RESOURCE_EXHAUSTED"]
    num_met = sum(met(o, slo) for o in outcomes)
    return {"attainment": num_met / len(outcomes),
            "admitted_attainment": num_met / len(admitted) if admitted else 0.0,
            "refused": 1 - len(admitted) / len(outcomes),
            "goodput": num_met / wall_s,
            "p90_ttft_text": _p90([o.ttft_ms for o in outcomes if o.cls == "text" and o.code == "OK"]),
            "p90_ttft_image": _p90([o.ttft_ms for o in outcomes if o.cls == "image" and o.code == "OK"])}


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) >= 2 else float("nan")


def plot(results: dict[str, dict[float, dict[str, float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for policy, by_rate in results.items():
        rates = sorted(by_rate)
        left.plot(rates, [by_rate[r]["attainment"] for r in rates], marker="o", label=policy)
        right.plot(rates, [by_rate[r]["goodput"] for r in rates], marker="o", label=policy)
    left.axhline(0.9, color="grey", linestyle=":")
    left.set(xlabel="offered rate (req/s)", ylabel="SLO attainment (all requests)", ylim=(0, 1.05))
    right.set(xlabel="offered rate (req/s)", ylabel="goodput (req/s meeting SLO)")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1,2,4,8", help="offered request rates (req/s), comma-separated")
    parser.add_argument("--requests", type=int, default=40, help="requests per rate")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--slo-factor", type=float, default=5.0, help="SLO = factor × lone-request latency")
    parser.add_argument("--slo-floor-ms", type=float, default=100.0,
                        help="smallest TTFT target (a quarter of it for TPOT): below it, timer noise decides")
    parser.add_argument("--mix", default="0.3,0.3,0.4", help="fractions of video, image and text requests")
    parser.add_argument("--plot", default="slo.png")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    mix = [float(x) for x in args.mix.split(",")]

    workdir = tempfile.mkdtemp(prefix="mmserve-slo-")
    model = str(build_tiny_model(pathlib.Path(workdir) / "model", seed=0))
    media = make_media()
    rng = random.Random(0)
    trace = rng.choices(CLASSES, weights=mix, k=args.requests)
    results: dict[str, dict[float, dict[str, float]]] = {}
    slo = None
    for policy in ("slo", "fcfs"):
        redis, redis_url = start_redis(workdir)  # a fresh cache per policy: neither inherits the other's hits
        stack, address = start_stack(model, redis_url, policy)
        try:
            if slo is None:
                slo = asyncio.run(calibrate(address, media, args.max_tokens, args.slo_factor, args.slo_floor_ms))
                print("SLO targets (ms): " + ", ".join(f"{k}={v:.0f}" for k, v in slo.items()), file=sys.stderr)
            results[policy] = {}
            for rate in rates:
                flush(redis_url)  # every rate starts with the same cold embedding cache
                outcomes, wall = asyncio.run(replay(address, rate, trace, media, slo, args.max_tokens, seed=int(rate),
                                                    salt=f"{policy}{rate}"))
                results[policy][rate] = summarize(outcomes, slo, wall)
                print(f"{policy} rate={rate}: {results[policy][rate]}", file=sys.stderr)
        finally:
            stack.stop()
            redis.stop()

    print(f"{'policy':<6}{'rate':>6}{'attain':>8}{'admitted':>10}{'refused':>9}{'goodput':>9}"
          f"{'p90 ttft text':>15}{'p90 ttft image':>16}")
    for policy, by_rate in results.items():
        for rate, r in by_rate.items():
            print(f"{policy:<6}{rate:>6.1f}{r['attainment']:>8.2f}{r['admitted_attainment']:>10.2f}"
                  f"{r['refused']:>9.2f}{r['goodput']:>9.2f}{r['p90_ttft_text']:>15.0f}{r['p90_ttft_image']:>16.0f}")
    plot(results, args.plot)
    # The highest rate at which the SLO-aware router keeps its promise to 90% of what it admits.
    kept = [r for r in rates if results["slo"][r]["admitted_attainment"] >= 0.9] or rates[:1]
    rate = max(kept)
    ratio = results["slo"][rate]["goodput"] / max(results["fcfs"][rate]["goodput"], 1e-9)
    print(f"plot: {args.plot}; compared at {rate} req/s")
    print(f"goodput_vs_fcfs={ratio:.2f}")


if __name__ == "__main__":
    main()
