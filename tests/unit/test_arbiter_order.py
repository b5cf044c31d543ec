"""The arbiter's order between prefill chunks, decode steps and encoder slices (fake clock, no threads but one)."""

from __future__ import annotations

import pytest

from services.router.costs import SharedDevice
from services.unified.arbiter import UNLIMITED, DeviceArbiter, SliceBudget, StepReport
from services.unified.config import ArbiterConfig
from tests.unit.test_arbiter import FakeScheduler, FakeSeq, Sim, slice_ms, step_ms


def test_a_long_prefill_step_is_not_charged_to_the_encoder():
    budget = SliceBudget(ArbiterConfig(max_decode_slowdown=1.2))
    for _ in range(50):
        budget.on_step(StepReport(step_ms(8), num_decodes=8, is_decode_only=True, num_running=8))
    before = budget.credit_ms
    # A media prompt's 400 ms prefill chunk rides along with the 8 decodes: the llm's own work, not a debt.
    budget.on_step(StepReport(400.0, num_decodes=8, is_decode_only=False, num_running=9))
    assert budget.credit_ms >= before > 0


def test_a_slice_is_not_blocked_behind_media_prefills_while_decodes_run():
    sim = Sim(ArbiterConfig(max_decode_slowdown=1.2), batch=8, backlog=[])
    for _ in range(20):
        sim.step()
    sim.backlog = [64] * 10
    for _ in range(10):  # every other step carries a 200 ms prefill chunk of a media prompt
        sim.scheduler.waiting = [FakeSeq(500)]
        sim.arbiter.acquire_step(sim.scheduler)
        sim.now += (step_ms(8) + 200.0) / 1e3
        sim.scheduler.waiting = []
        sim.arbiter.release_step(sim.scheduler)
        sim._run_slices()
        sim.step()
    assert not sim.backlog  # the slack of the decode steps paid for the slices


def test_an_idle_slice_is_bounded_so_a_prefill_waits_little():
    sim = Sim(ArbiterConfig(max_idle_slice_ms=20.0), batch=0, backlog=[64] * 400)
    sim.arbiter.budget.encode.model.weights = [3.0, 0.02]  # learnt: 3 ms + 0.02 ms per patch
    sim.step()
    assert not sim.backlog and len(sim.slices_ms) > 1
    assert max(sim.slices_ms) <= 20.0 and UNLIMITED not in sim.granted


def test_an_item_larger_than_the_idle_bound_still_runs_whole():
    budget = SliceBudget(ArbiterConfig(max_idle_slice_ms=20.0))
    budget.encode.model.weights = [3.0, 0.02]
    assert budget.max_patches(5000) == 5000  # 103 ms: the first item always goes
    assert budget.max_patches(10) == int((20.0 - 3.0) / 0.02)


def test_prefill_due_before_the_slice_keeps_the_device():
    arbiter = DeviceArbiter(SliceBudget(ArbiterConfig()), clock=lambda: 0.0)
    scheduler = FakeScheduler([], waiting=[FakeSeq(500, priority=10.0)])  # a text prompt due at t=10
    arbiter.acquire_step(scheduler)
    later = arbiter.request_slice(64, lambda n: None, deadline=20.0)
    arbiter.release_step(scheduler, will_step_again=True)
    assert not later.is_granted  # the prompt's next chunk goes first
    arbiter.acquire_step(scheduler)
    scheduler.waiting = []  # its last chunk
    arbiter.release_step(scheduler, will_step_again=True)
    assert later.is_granted


def test_a_slice_due_before_the_prefill_goes_first():
    arbiter = DeviceArbiter(SliceBudget(ArbiterConfig()), clock=lambda: 0.0)
    scheduler = FakeScheduler([], waiting=[FakeSeq(500, priority=30.0)])
    arbiter.acquire_step(scheduler)
    sooner = arbiter.request_slice(64, lambda n: None, deadline=20.0)
    arbiter.release_step(scheduler, will_step_again=True)
    assert sooner.is_granted


def test_prefill_that_cannot_run_keeps_nothing_from_the_encoder():
    arbiter = DeviceArbiter(SliceBudget(ArbiterConfig()), clock=lambda: 0.0)
    scheduler = FakeScheduler([], waiting=[FakeSeq(500, priority=10.0)])
    arbiter.acquire_step(scheduler)
    waiting = arbiter.request_slice(64, lambda n: None, deadline=20.0)
    arbiter.release_step(scheduler, will_step_again=False)  # the step ran nothing (its media is missing)
    assert waiting.is_granted  # else nobody would grant it: the engine sleeps until news


class _Role:
    num_in_flight = 1


def test_overlap_prices_each_role_by_its_share_of_the_cores():
    device = SharedDevice(1.2, overlap_share=0.25)
    assert device.encode_factor(_Role()) == pytest.approx(4.0)  # one core of four for the encoder
    assert device.step_factor(_Role()) == pytest.approx(4 / 3)  # three for the steps
    assert device.prefill_factor(_Role()) == pytest.approx(4 / 3)
    turns = SharedDevice(1.2)
    assert turns.encode_factor(_Role()) == pytest.approx(6.0) and turns.step_factor(_Role()) == pytest.approx(1.2)


class FakeStreams:
    """RoleStreams without CUDA: counts the engine thread's stream switches."""

    encoder = "encoder-stream"

    def __init__(self):
        self.num_llm_switches = 0

    def use_llm(self) -> None:
        self.num_llm_switches += 1


def test_gpu_streams_run_one_bounded_slice_beside_each_decode_step():
    streams = FakeStreams()
    arbiter = DeviceArbiter(SliceBudget(ArbiterConfig(max_decode_slowdown=1.5)), clock=lambda: 0.0, streams=streams)
    decoding = FakeScheduler([FakeSeq() for _ in range(8)])
    arbiter.acquire_step(decoding)
    arbiter.release_step(decoding)  # decodes are running now
    arbiter.budget.encode.model.weights = [3.0, 0.02]  # learnt
    arbiter.budget.step.model.weights = [10.0, 0.0]  # a decode step alone: 10 ms, so one token's target is 15 ms
    arbiter.acquire_step(decoding)  # the llm holds the device...
    first = arbiter.request_slice(64, lambda n: None)
    assert first.is_granted and first.max_patches == int((15.0 - 3.0) / 0.02)  # ...and a bounded slice runs beside
    assert arbiter.encoder_stream == "encoder-stream" and first.num_threads == 0
    first.num_patches = 64
    arbiter.release_slice(first)
    second = arbiter.request_slice(64, lambda n: None)
    assert not second.is_granted  # one per llm step
    arbiter.release_step(decoding)
    assert second.is_granted
    assert streams.num_llm_switches == 1  # the engine thread's stream is set once
