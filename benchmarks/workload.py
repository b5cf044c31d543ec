"""The mixed trace the SLO benchmarks replay (slo.py, goodput.py): media, requests, Poisson replay, calibration,
outcomes, summaries and the attainment plot, plus the stack and Redis they start."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import shutil
import statistics
import time

import mmserve  # noqa: F401  (first: turns gRPC's fork handlers off before grpc loads; see its __init__)
import grpc

from mmserve import rpc
from stack.launcher import Child, Stack, StackSpec, plan, redis_server_argv
from stack.ports import free_port
from mmserve.media.samples import make_image, make_video
from mmserve.v1 import api_pb2, api_pb2_grpc

CLASSES = ("video", "image", "text")
Media = dict[str, list[bytes]]


@dataclasses.dataclass
class Outcome:
    cls: str
    code: str  # "OK" or the gRPC status name
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    detail: str = ""  # the status message of a failed request
    stages: dict[str, float] = dataclasses.field(default_factory=dict)  # the router's timings (ms) of a completed one


def make_media(num_variants: int = 8, seed: int = 0) -> Media:
    """num_variants distinct clips and pictures, so the embedding cache does not answer everything. Another seed
    gives others, whatever either's count: no item is shared, so no run hits what another one cached."""
    seeds = range(seed * 100_000, seed * 100_000 + num_variants)
    return {"video": [make_video(seconds=2.0, fps=10, width=224, height=168, seed=s) for s in seeds],
            "image": [make_image(width=336, height=252, seed=s) for s in seeds]}


def make_trace(num_requests: int, mix: list[float], seed: int = 0) -> list[str]:
    """Request classes in arrival order, drawn with the mix's weights (video, image, text)."""
    return random.Random(seed).choices(CLASSES, weights=mix, k=num_requests)


def build(cls: str, i: int, media: Media, slo: dict[str, float], max_tokens: int,
          salt: str) -> api_pb2.GenerateRequest:
    """Request i of the trace: its media variant, a prompt made distinct by salt, exactly max_tokens greedy tokens."""
    parts = []
    if cls != "text":
        data = media[cls][i % len(media[cls])]
        parts.append(api_pb2.Part(**{cls: api_pb2.Media(data=data)}))
    parts.append(api_pb2.Part(text=f"{salt} request {i}: describe it in detail."))
    return api_pb2.GenerateRequest(
        messages=[api_pb2.Message(role="user", parts=parts)],
        sampling=api_pb2.SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0),
        slo=api_pb2.Slo(ttft_ms=int(slo[cls]), tpot_ms=int(slo["tpot"])))


async def run_one(stub, cls: str, request: api_pb2.GenerateRequest, timeout_s: float = 120) -> Outcome:
    """One request to the end, timed by the client: TTFT to the first token, TPOT over the rest."""
    start = time.perf_counter()
    first = None
    tokens = 0
    stages = {}
    try:
        async for reply in stub.Generate(request, timeout=timeout_s):
            if reply.WhichOneof("event") == "delta" and reply.delta.token_ids:
                first = first or time.perf_counter()
                tokens += len(reply.delta.token_ids)
            elif reply.WhichOneof("event") == "final":
                stages = {f.name: v for f, v in reply.final.timings.ListFields()}
        end = time.perf_counter()
    except grpc.aio.AioRpcError as err:
        return Outcome(cls, err.code().name, detail=err.details() or "")
    ttft = ((first or end) - start) * 1e3
    return Outcome(cls, "OK", ttft, (end - first) * 1e3 / max(1, tokens - 1) if first else 0.0, stages=stages)


def met(o: Outcome, slo: dict[str, float]) -> bool:
    return o.code == "OK" and o.ttft_ms <= slo[o.cls] and o.tpot_ms <= slo["tpot"]


def _channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=rpc.message_options(64 << 20))


async def replay(address: str, rate: float, trace: list[str], media: Media, slo, max_tokens: int, seed: int,
                 salt: str) -> tuple[list[Outcome], float]:
    """Sends the trace with Poisson arrivals at rate; returns the outcomes and the wall time."""
    rng = random.Random(seed)
    async with _channel(address) as channel:
        stub = api_pb2_grpc.RouterStub(channel)
        start = time.perf_counter()
        tasks = []
        for i, cls in enumerate(trace):
            tasks.append(asyncio.ensure_future(run_one(stub, cls, build(cls, i, media, slo, max_tokens, salt))))
            await asyncio.sleep(rng.expovariate(rate))
        outcomes = await asyncio.gather(*tasks)
        return list(outcomes), time.perf_counter() - start


async def lone_latencies(address: str, media: Media, max_tokens: int, num_rounds: int = 4) -> dict[str, float]:
    """Median lone-request TTFT per class and TPOT ("tpot"); the first round only warms caches and lazy paths."""
    ttft: dict[str, list[float]] = {c: [] for c in CLASSES}
    tpot: list[float] = []
    loose = {c: 1e9 for c in CLASSES} | {"tpot": 1e9}
    async with _channel(address) as channel:
        stub = api_pb2_grpc.RouterStub(channel)
        for round_ in range(num_rounds):
            for cls in CLASSES:
                o = await run_one(stub, cls, build(cls, round_, media, loose, max_tokens, f"calibrate{round_}"))
                assert o.code == "OK", o
                if round_:
                    ttft[cls].append(o.ttft_ms)
                    tpot.append(o.tpot_ms)
    return {c: statistics.median(v) for c, v in ttft.items()} | {"tpot": statistics.median(tpot)}


def slo_targets(lone: dict[str, float], factor: float, floor_ms: float) -> dict[str, float]:
    """SLO targets: factor times the lone-request latencies, with a floor (a quarter of it for TPOT)."""
    return {c: max(floor_ms, factor * lone[c]) for c in CLASSES} | {"tpot": max(floor_ms / 4, factor * lone["tpot"])}


def parse_slo_ms(text: str) -> dict[str, float]:
    """Fixed SLO targets as the benchmarks' --slo-ms gives them: video=2727,image=981,text=112,tpot=55."""
    return {name: float(ms) for name, ms in (kv.split("=") for kv in text.split(","))}


# A benchmark's stack lets its clients ask for loose SLO targets (lone latencies, capacity, warm-ups measure speed,
# not admission); a production router caps them at its own defaults.
LOOSE_SLO_CAPS = ("--max-slo-ttft-ms", "1e9", "--max-slo-tpot-ms", "1e9")


def start_stack(model: str, redis_url: str, router_args: tuple[str, ...] = (),
                media_root: str = "") -> tuple[Stack, str]:
    """mmserve's four services as separate processes, healthy; returns the stack and the router address."""
    spec = StackSpec(model=model, port=free_port(), redis_url=redis_url, log_level="ERROR",
                     router_args=LOOSE_SLO_CAPS + tuple(router_args), media_root=media_root)
    planned = plan(spec)
    children, address = planned.children(), planned.router_address
    stack = Stack(children)
    stack.start()
    asyncio.run(stack.wait_healthy(300))
    return stack, address


def start_redis(workdir: str) -> tuple[Stack, str]:
    """A private redis-server for the embedding cache; returns it and its URL."""
    import redis

    port = free_port()
    server = Stack([Child("redis", redis_server_argv(shutil.which("redis-server"), "127.0.0.1", port,
                                                     maxmemory="512mb", workdir=workdir), None)])
    server.start()
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return server, f"redis://127.0.0.1:{port}/0"


def flush(redis_url: str) -> None:
    import redis

    redis.Redis.from_url(redis_url).flushall()


def summarize(outcomes: list[Outcome], slo, wall_s: float) -> dict[str, float]:
    """Attainment (refusals and errors count as misses), attainment of what was admitted, goodput, TTFT quantiles."""
    admitted = [o for o in outcomes if o.code != "RESOURCE_EXHAUSTED"]
    num_met = sum(met(o, slo) for o in outcomes)
    ok = [o for o in outcomes if o.code == "OK"]
    return {"attainment": num_met / len(outcomes),
            "admitted_attainment": num_met / len(admitted) if admitted else 0.0,
            "refused": 1 - len(admitted) / len(outcomes),
            "errors": sum(o.code not in ("OK", "RESOURCE_EXHAUSTED") for o in outcomes) / len(outcomes),
            "goodput": num_met / wall_s,
            "p50_ttft": _quantile([o.ttft_ms for o in ok], 2),
            "p90_ttft": _quantile([o.ttft_ms for o in ok], 10),
            "p90_ttft_text": _quantile([o.ttft_ms for o in ok if o.cls == "text"], 10),
            "p90_ttft_image": _quantile([o.ttft_ms for o in ok if o.cls == "image"], 10)}


def highest_rate(by_rate: dict[float, dict[str, float]], threshold: float = 0.9) -> float:
    """The highest offered rate with at least threshold attainment (0 when none)."""
    return max((rate for rate, r in by_rate.items() if r["attainment"] >= threshold), default=0.0)


def failures(outcomes: list[Outcome]) -> str:
    """Failed requests by class and status, with the first and the last message of each kind (for the log: a
    router's first refusals are priced with its calibration's prior, its last ones with what it learnt)."""
    kinds: dict[tuple[str, str], list[str]] = {}
    for o in outcomes:
        if o.code != "OK":
            kinds.setdefault((o.cls, o.code), []).append(o.detail)
    return "; ".join(f"{cls} {code} x{len(d)} (first: {d[0]}" + (f"; last: {d[-1]})" if len(d) > 1 else ")")
                     for (cls, code), d in sorted(kinds.items())) or "none"


def _quantile(values: list[float], n: int) -> float:
    """The top n-quantile cut (n=2: median, n=10: p90)."""
    return statistics.quantiles(values, n=n)[-1] if len(values) >= 2 else float("nan")


def plot(results: dict[str, dict[float, dict[str, float]]], path: str) -> None:
    """Attainment and goodput against the offered rate, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, by_rate in results.items():
        rates = sorted(by_rate)
        left.plot(rates, [by_rate[r]["attainment"] for r in rates], marker="o", label=name)
        right.plot(rates, [by_rate[r]["goodput"] for r in rates], marker="o", label=name)
    left.axhline(0.9, color="grey", linestyle=":")
    left.set(xlabel="offered rate (req/s)", ylabel="SLO attainment (all requests)", ylim=(0, 1.05))
    right.set(xlabel="offered rate (req/s)", ylabel="goodput (req/s meeting SLO)")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
