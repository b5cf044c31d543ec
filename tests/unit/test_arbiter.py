"""The unified replica's device arbiter in isolation: a fake clock, fake step and slice costs, no threads but one."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading

import pytest

from services.unified.arbiter import UNLIMITED, DeviceArbiter, SliceBudget, StepReport
from services.unified.config import ArbiterConfig


@dataclasses.dataclass
class FakeSeq:
    num_uncomputed_tokens: int = 1  # 1: decoding
    priority: float = math.inf  # the router's deadline

    @property
    def num_schedulable_tokens(self) -> int:
        return self.num_uncomputed_tokens


@dataclasses.dataclass
class FakeScheduler:
    running: list
    waiting: list = dataclasses.field(default_factory=list)


def step_ms(batch: int) -> float:
    return 8.0 + 0.5 * batch  # not the seeds: the arbiter must learn it


def slice_ms(patches: int) -> float:
    return 3.0 + 0.02 * patches


class Sim:
    """An llm that steps back to back with `batch` decodes and an encoder with a backlog, on one fake clock."""

    def __init__(self, config: ArbiterConfig, batch: int, backlog: list[int]):
        self.now = 0.0
        self.arbiter = DeviceArbiter(SliceBudget(config), clock=lambda: self.now)
        self.scheduler = FakeScheduler([FakeSeq() for _ in range(batch)])
        self.backlog = list(backlog)  # patches of each queued item
        self.token_times: list[float] = []
        self.encoded: list[float] = []  # when each item finished
        self.granted: list[int] = []
        self.slices_ms: list[float] = []  # how long each slice held the device
        self._request = None

    def _grant(self, max_patches: int) -> None:
        self.granted.append(max_patches)

    def _run_slices(self) -> None:
        """Runs every slice granted now, asking again while the backlog lasts."""
        while self.backlog:
            if self._request is None:
                self._request = self.arbiter.request_slice(self.backlog[0], self._grant)
            if not self._request.is_granted:
                return
            request, self._request = self._request, None
            taken = [self.backlog.pop(0)]
            while self.backlog and sum(taken) + self.backlog[0] <= request.max_patches:
                taken.append(self.backlog.pop(0))
            self.now += slice_ms(sum(taken)) / 1e3
            self.slices_ms.append(slice_ms(sum(taken)))
            self.encoded += [self.now] * len(taken)
            request.num_patches = sum(taken)
            self.arbiter.release_slice(request)

    def step(self) -> None:
        self.arbiter.acquire_step(self.scheduler)
        self.now += step_ms(len(self.scheduler.running)) / 1e3
        self.token_times.append(self.now)
        self.arbiter.release_step(self.scheduler)
        self._run_slices()


def test_decode_deadlines_hold_while_an_encoder_backlog_drains():
    config = ArbiterConfig(max_decode_slowdown=1.2, max_saved_steps=8)
    sim = Sim(config, batch=16, backlog=[64] * 1500)  # ~2000 steps of slack
    num_steps = 3000
    for _ in range(num_steps):
        sim.step()
    alone_ms = step_ms(16)
    gaps = [(b - a) * 1e3 for a, b in zip(sim.token_times, sim.token_times[1:])]
    assert not sim.backlog and len(sim.encoded) == 1500  # drained
    assert sum(gaps) < num_steps * step_ms(16)  * 1.2  # the slowdown bound over the whole run
    # Any stretch of tokens: at most the target per token plus the credit that can be saved up (and one slice
    # priced before the models had learnt the real costs).
    budget = sim.arbiter.budget
    slack_ms = config.max_saved_steps * (1.2 - 1) * alone_ms + slice_ms(64)
    for width in (1, 10, 100, 1000):
        for i in range(0, len(gaps) - width, 7):
            assert sum(gaps[i:i + width]) <= width * 1.2 * alone_ms + slack_ms + 1e-6
    assert budget.step.predict(16) == pytest.approx(alone_ms, rel=0.01)  # learnt from the decode-only steps
    assert sim.arbiter.budget.num_deferred == 0


def test_encoder_takes_the_device_whole_when_no_decode_runs():
    sim = Sim(ArbiterConfig(max_idle_slice_ms=0), batch=0, backlog=[1000] * 5)  # unbounded when idle
    sim.step()  # a prefill step, no decode running after it
    assert sim.granted[0] == UNLIMITED
    assert not sim.backlog  # all five in the first slice


def test_a_sequence_waiting_for_its_media_leaves_the_device_to_the_encoder_that_makes_it():
    # Streamed prefill: the only running sequence has prompt left but none it can run until the encoder's next
    # chunk arrives, so the llm steps no more; counted as a decode to protect, the slice would wait for ever.
    sim = Sim(ArbiterConfig(), batch=0, backlog=[1000])
    sim.scheduler.running.append(WaitingForMedia(num_uncomputed_tokens=300))
    sim.step()  # the text before the video; then nothing to run
    assert not sim.backlog and sim.granted


@dataclasses.dataclass
class WaitingForMedia(FakeSeq):
    @property
    def num_schedulable_tokens(self) -> int:
        return 0


def test_encoder_is_not_starved_under_light_decode_load():
    # 2 decodes against a 100 ms time-per-token target: the steps (9 ms) leave most of each token's time.
    config = ArbiterConfig(max_decode_slowdown=0.0, tpot_target_ms=100.0, max_saved_steps=4)
    sim = Sim(config, batch=2, backlog=[256] * 200)
    while sim.backlog:
        sim.step()
    steps = len(sim.token_times)
    encode_s = sum(slice_ms(256) for _ in range(200)) / 1e3
    assert sim.now < 1.3 * (encode_s + steps * step_ms(2) / 1e3)  # the device was hardly idle
    assert steps * 100 / 1e3 >= sim.now - 0.1  # and the decodes kept their 100 ms per token on the whole


def test_an_item_larger_than_any_saved_credit_still_runs():
    config = ArbiterConfig(max_decode_slowdown=1.2, max_saved_steps=2)
    sim = Sim(config, batch=4, backlog=[4096] * 3)  # ~85 ms each; at most ~4 ms of credit can be saved
    for _ in range(2000):
        sim.step()
        if not sim.backlog:
            break
    assert not sim.backlog
    gaps = [(b - a) * 1e3 for a, b in zip(sim.token_times, sim.token_times[1:])]
    assert sum(gaps) <= len(gaps) * 1.2 * step_ms(4) + slice_ms(4096)  # each debt repaid before the next


def test_a_waiting_slice_cancelled_is_never_granted():
    sim = Sim(ArbiterConfig(max_saved_steps=1), batch=8, backlog=[])
    for _ in range(3):
        sim.step()  # the models settle; the credit is one step's slack, ~2.4 ms
    granted = []
    request = sim.arbiter.request_slice(100_000, granted.append)  # far more than the credit: deferred
    assert not request.is_granted
    sim.arbiter.cancel(request)
    for _ in range(20):
        sim.step()  # the credit fills and stays full: a request still waiting would now be forced
    assert granted == [] and not request.is_granted
    again = sim.arbiter.request_slice(1, granted.append)
    assert again.is_granted and granted


def test_a_granted_slice_cancelled_frees_the_device_for_the_llm():
    async def main():
        arbiter = DeviceArbiter(SliceBudget(ArbiterConfig()))
        scheduler = FakeScheduler([], waiting=[FakeSeq(100)])  # a prefill: nothing that paces the encoder
        holding = asyncio.Event()

        async def encoder():
            async with arbiter.slice(64):
                holding.set()
                await asyncio.sleep(3600)  # cancelled while it holds the device

        task = asyncio.create_task(encoder())
        await holding.wait()
        stepped = threading.Event()

        def llm():
            arbiter.acquire_step(scheduler)
            arbiter.release_step(scheduler)
            stepped.set()

        thread = threading.Thread(target=llm)
        thread.start()
        await asyncio.sleep(0.05)
        assert not stepped.is_set()  # the slice holds the device
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert await asyncio.to_thread(stepped.wait, 10)
        thread.join()
        async with arbiter.slice(64) as turn:  # and the next slice gets a turn
            assert turn.max_patches > 0

    asyncio.run(main())


def test_a_slice_waiting_for_its_turn_can_be_cancelled():
    async def main():
        arbiter = DeviceArbiter(SliceBudget(ArbiterConfig()))
        scheduler = FakeScheduler([FakeSeq() for _ in range(4)])
        arbiter.acquire_step(scheduler)  # the llm holds the device

        async def encoder():
            async with arbiter.slice(64):
                raise AssertionError("granted after cancellation")

        task = asyncio.create_task(encoder())
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        arbiter.release_step(scheduler)  # would grant a request still waiting
        arbiter.acquire_step(scheduler)  # the device is free: no deadlock
        arbiter.release_step(scheduler)

    asyncio.run(main())


def test_steps_that_cost_nothing_measurable_leave_no_credit_and_break_nothing():
    budget = SliceBudget(ArbiterConfig())
    budget.step.model.weights = [0.0, 0.0]  # what the non-negative fit gives steps too fast to time
    budget.on_step(StepReport(0.0, num_decodes=4, is_decode_only=False, num_running=4))
    assert budget.target_ms(4) == 0.0 and budget.credit_ms == 0.0 and budget.max_patches(10) == 0


def test_overlap_runs_a_slice_beside_the_decodes_on_threads_of_its_own():
    threads = []
    arbiter = DeviceArbiter(SliceBudget(ArbiterConfig()), overlap_threads=1, llm_threads=4,
                            set_llm_threads=threads.append)
    decoding = FakeScheduler([FakeSeq() for _ in range(8)])
    arbiter.acquire_step(decoding)
    arbiter.release_step(decoding)  # decodes are running now
    arbiter.acquire_step(decoding)  # the llm holds the device...
    side = arbiter.request_slice(100_000, lambda n: None)
    assert side.is_granted and side.num_threads == 1 and side.max_patches == UNLIMITED  # ...and a slice runs beside
    arbiter.release_step(decoding)
    arbiter.acquire_step(decoding)  # the next step runs on the other three threads, without waiting
    assert threads == [3]
    arbiter.release_step(decoding)
    side.num_patches = 100_000
    arbiter.release_slice(side)
    assert arbiter.budget.credit_ms >= 0  # a slice on its own threads is not charged to the decodes
    arbiter.acquire_step(decoding)
    assert threads == [3, 4]  # alone again: every thread
    arbiter.release_step(decoding)


def test_overlap_takes_turns_when_no_decode_runs():
    threads = []
    arbiter = DeviceArbiter(SliceBudget(ArbiterConfig()), overlap_threads=1, llm_threads=4,
                            set_llm_threads=threads.append)
    prefill = FakeScheduler([], waiting=[FakeSeq(50)])
    whole = arbiter.request_slice(64, lambda n: None)
    assert whole.is_granted and whole.num_threads == 0  # the device whole: the encoder's own threads
    blocked = threading.Thread(target=arbiter.acquire_step, args=(prefill,))
    blocked.start()
    blocked.join(0.05)
    assert blocked.is_alive()  # the llm waits for its turn
    arbiter.release_slice(whole)
    blocked.join(10)
    assert not blocked.is_alive() and threads == []  # all four threads: nothing ran beside it
    arbiter.release_step(prefill)
