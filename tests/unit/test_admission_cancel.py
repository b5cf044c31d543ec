"""Cancelled requests leave admission exactly as before: backlogs, outstanding work, probes, calibration."""

from __future__ import annotations

import asyncio
import random

from services.router.admission import Controller
from services.router.costs import CostSeeds, DecodeCost, LlmCosts, MediaShape, encode_cost
from services.router.policy import Slo, SloDefaults
from services.router.replicas import Replica, ReplicaPool

_STAGES = ("decoder", "encoder", "llm")


def make_stack(step_ms: float = 5.0) -> Controller:
    """Admission over one fake replica per stage (two slots each) with the real cost models."""
    costs = {"decoder": lambda: DecodeCost(CostSeeds()), "encoder": lambda: encode_cost(CostSeeds()),
             "llm": lambda: LlmCosts(CostSeeds(step_ms=step_ms))}
    pools = []
    for stage in _STAGES:
        pool = ReplicaPool(stage, stub_class=None, max_message_bytes=0, make_costs=costs[stage], max_in_flight=2)
        pool.replicas["r0"] = Replica("r0", channel=None, stub=None, costs=costs[stage](), healthy=True)
        pools.append(pool)
    return Controller(*pools, defaults=SloDefaults(Slo(8000, 100), Slo(3000, 100), Slo(1000, 100)),
                      policy="slo", headroom=1.0)


def shape(i: int) -> MediaShape:
    return MediaShape(2.0 + i % 5, 123_457.0 * (i + 1), 97.3 * (i + 1))  # odd sizes: costs with long fractions


async def serve(controller: Controller, i: int, hang_at: str | None, *, tpot_ms: float = 0.0) -> None:
    """A request's way through the router's bookkeeping (as server.py and media.py keep it); it hangs at hang_at
    (None: runs to its end), where its cancellation finds it."""
    s = shape(i)
    ticket = controller.admit(["video"], [s], 50.0 + 7.3 * i, ttft_ms=0, tpot_ms=tpot_ms, allow_degrade=False,
                              now=100.0)
    assert ticket.decision.admit
    pools, hang = controller.pools, asyncio.Event()
    cancelled = False
    try:
        async with pools["decoder"].slot(latest_start=ticket.latest_start,
                                         work_ms=lambda r: r.costs.predict(s.num_frames, s.num_pixels)):
            await (hang.wait() if hang_at == "decoder" else asyncio.sleep(0))
        async with pools["encoder"].slot(latest_start=ticket.latest_start, work_ms=lambda r: r.costs.predict(s.num_patches)):
            await (hang.wait() if hang_at == "encoder" else asyncio.sleep(0))
        controller.finish(ticket, "decoder")
        controller.finish(ticket, "encoder")
        prefill_ms = ticket.prediction.llm.work_ms
        async with pools["llm"].slot(latest_start=ticket.deadline,
                                     work_ms=lambda r: prefill_ms + r.costs.step.predict(r.num_in_flight)):
            controller.at_llm(ticket, True)
            await (hang.wait() if hang_at == "prefill" else asyncio.sleep(0))
            controller.finish(ticket, "llm")  # the first token
            await (hang.wait() if hang_at == "decode" else asyncio.sleep(0))
    except asyncio.CancelledError:
        cancelled = True
        raise
    finally:
        controller.release(ticket, is_cancelled=cancelled)


def book(controller: Controller) -> dict:
    """Everything the pricing of the next request reads."""
    return {"prediction": controller.predict([shape(3)], 80.0, 104.0),
            "backlogs": {s: (len(b), b.total_ms(), b.work_ahead_ms(104.0)) for s, b in controller.backlogs.items()},
            "replicas": {s: [(r.num_in_flight, r.outstanding_ms) for r in p.replicas.values()]
                         for s, p in controller.pools.items()},
            "waiting": {s: p.num_waiting for s, p in controller.pools.items()},
            "ttft_scale": {c: k.scale(0.95) for c, k in controller.ttft_calibration.items()},
            "tpot_scale": controller.tpot_calibration.scale(0.95), "strictness": controller.strictness.value}


async def test_a_cancelled_burst_leaves_the_next_request_priced_exactly_as_before():
    controller = make_stack()
    # Two requests keep running through the burst: one streaming tokens, one waiting at the decoder.
    kept = [asyncio.ensure_future(serve(controller, 1000 + j, hang_at)) for j, hang_at in enumerate(("decode", "decoder"))]
    for _ in range(10):
        await asyncio.sleep(0)
    before = book(controller)
    assert before["replicas"]["llm"][0][1] > 0  # the streaming one's work is on the book

    hang_points = ("decoder", "encoder", "prefill", "decode")
    burst = [asyncio.ensure_future(serve(controller, i, hang_points[i % 4])) for i in range(160)]
    order = list(range(len(burst)))
    random.Random(19).shuffle(order)
    for start in range(0, len(order), 7):  # a few at a time: freed slots pass to waiters that are cancelled later
        for _ in range(3):
            await asyncio.sleep(0)
        for i in order[start:start + 7]:
            burst[i].cancel()
    await asyncio.gather(*burst, return_exceptions=True)
    for _ in range(10):
        await asyncio.sleep(0)

    assert book(controller) == before
    for task in kept:
        task.cancel()
    await asyncio.gather(*kept, return_exceptions=True)


async def test_a_cancelled_burst_does_not_postpone_a_probe():
    controller = make_stack(step_ms=300.0)  # a pessimistic model: a request with the 100 ms target misses
    admit = lambda now: controller.admit([], [], 20, ttft_ms=0, tpot_ms=0, allow_degrade=False, now=now)  # noqa: E731
    # Requests with a lenient time-per-token target are admitted at 100 s; their clients all go away.
    burst = [asyncio.ensure_future(serve(controller, i, "prefill", tpot_ms=10_000)) for i in range(50)]
    for _ in range(10):
        await asyncio.sleep(0)
    for task in burst:
        task.cancel()
    await asyncio.gather(*burst, return_exceptions=True)
    probe = admit(101.0)  # idle, and nothing that measured anything was ever admitted
    assert probe.decision.admit and probe.decision.reason == "probe"
    controller.release(probe)
    assert not admit(102.0).decision.admit  # a probe that ran does postpone the next
