"""Device-time arbiter of a unified replica: the llm's steps and the encoder's slices take turns on one device.

Decode steps come first. Each llm step that leaves decodes running earns the encoder a credit: the time per
token the decodes may take (`max_decode_slowdown` times the step's predicted cost alone, or `tpot_target_ms`,
the tighter of the two) less what the step's decodes took: a prefill chunk in the step is the llm's own work,
budgeted by its scheduler, not the encoder's debt, so a step is charged at most its decodes' predicted cost.
An encoder slice is granted between two llm steps with as many patches as the credit pays for, priced by the
same online cost models the router fits (services/router/costs.py); what it really took is charged
afterwards. So over any stretch of steps the decodes' time per token stays within its target while the
encoder drains its backlog in whatever is left.

With no decode running there is nothing to protect but the next prefill: a slice is bounded to about
`max_idle_slice_ms`. Prefill chunks and slices go by deadline: after a step that leaves prefill work due before
the waiting slice's deadline, the device stays with the llm for its next step. An item too large for any credit
the decodes can save (at most `max_saved_steps` steps of slack) is not starved: once the credit is full it runs
anyway, and the debt is paid back by the next steps.

On a CPU with `overlap_threads`, while decodes run a slice instead runs beside the steps on threads of its own
(the steps keep the rest): the credit does not apply, the core split is the protection. On a GPU with role
streams (services/unified/gpu.py) a slice likewise runs beside the steps, on a low-priority stream, bounded to
about one token's target and one slice per llm step.

The core (SliceBudget) is pure arithmetic; DeviceArbiter adds the turn-taking between the llm's engine
thread and the encoder's batcher, with a condition variable and callbacks (no torch, no grpc).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable

from services.router.costs import CostSeeds, TokenCost, encode_cost, step_cost
from services.unified import metrics
from services.unified.config import ArbiterConfig

log = logging.getLogger(__name__)

UNLIMITED = 1 << 62  # patches: no bound beyond the batcher's own


@dataclasses.dataclass(frozen=True)
class StepReport:
    """One llm step as the arbiter sees it."""

    step_ms: float
    num_decodes: int  # sequences that made one token from one new token this step
    is_decode_only: bool  # no prefill chunk in it: a sample of the decode step cost
    num_running: int  # decodes still running after it (0: nothing to protect)


class SliceBudget:
    """How much encoder work fits between two llm steps (pure Python, driven by step and slice reports)."""

    def __init__(self, config: ArbiterConfig, seeds: CostSeeds | None = None):
        seeds = seeds or CostSeeds()
        self.max_decode_slowdown = config.max_decode_slowdown
        self.tpot_target_ms = config.tpot_target_ms
        self.max_saved_steps = config.max_saved_steps
        self.max_idle_slice_ms = config.max_idle_slice_ms
        self.step = step_cost(seeds)  # decode step ms by running sequences
        self.encode: TokenCost = encode_cost(seeds)  # slice ms by patches
        self.credit_ms = 0.0
        self.num_running = 0
        self.num_deferred = 0  # slices refused since the last one ran

    def target_ms(self, num_decodes: int) -> float:
        """The time per token the running decodes may take, encoder slices included."""
        bounds = [self.max_decode_slowdown * self.step.predict(num_decodes)] if self.max_decode_slowdown else []
        return min(bounds + ([self.tpot_target_ms] if self.tpot_target_ms else []))

    def max_credit_ms(self) -> float:
        return self.max_saved_steps * max(0.0, self.target_ms(self.num_running) - self.step.predict(self.num_running))

    def on_step(self, report: StepReport) -> None:
        """An llm step ended: learn its cost and earn (or spend) credit."""
        if report.is_decode_only and report.num_decodes:
            self.step.observe(report.num_decodes, report.step_ms)
        self.num_running = report.num_running
        if report.num_decodes:
            decode_ms = report.step_ms
            if not report.is_decode_only:  # the prefill in it is the llm's own, not a debt of the encoder's
                decode_ms = min(decode_ms, self.step.predict(report.num_decodes))
            earned = self.target_ms(report.num_decodes) - decode_ms
            self.credit_ms = min(self.max_credit_ms(), self.credit_ms + earned)
        if not self.num_running:
            self.credit_ms = max(self.credit_ms, 0.0)  # nobody left to pay a debt to

    def max_patches(self, first_patches: int) -> int:
        """Patches the next slice may hold (0: wait for another step); the first item always fits when any does."""
        fixed, per_patch = self.encode.model.weights
        if not self.num_running:
            if not self.max_idle_slice_ms or per_patch <= 0:
                return UNLIMITED
            return max(first_patches, int((self.max_idle_slice_ms - fixed) / per_patch))
        fits = int((self.credit_ms - fixed) / per_patch) if per_patch > 0 else UNLIMITED
        if fits >= first_patches:
            return fits
        if self.num_deferred and self.credit_ms >= self.max_credit_ms() - 1e-9:
            return first_patches  # as much credit as can ever be saved: run it, repay it over the next steps
        return 0

    def max_side_patches(self, first_patches: int) -> int:
        """Patches a slice beside the steps (GPU streams) may hold: about one token's target of the decodes."""
        fixed, per_patch = self.encode.model.weights
        if per_patch <= 0:
            return UNLIMITED
        return max(first_patches, int((self.target_ms(self.num_running) - fixed) / per_patch))

    def on_slice(self, num_patches: int, slice_ms: float) -> None:
        """A slice ended: learn its cost and charge it."""
        if num_patches:
            self.encode.observe(num_patches, slice_ms)
        if self.num_running:
            self.credit_ms -= slice_ms


@dataclasses.dataclass(eq=False)
class SliceRequest:
    """The encoder's ask for a turn; `on_grant(max_patches)` is called (from any thread) when it gets one."""

    first_patches: int
    on_grant: Callable[[int], None]
    asked_at: float
    deadline: float = math.inf  # its first item's due time (wall-clock seconds, as the llm's priorities)
    granted_at: float = 0.0
    max_patches: int = 0
    num_threads: int = 0  # torch threads the slice may use (0: the encoder's own --num-threads)
    num_patches: int = 0  # what the slice ran, set by its holder before the release
    is_granted: bool = False
    is_released: bool = False


class DeviceArbiter:
    """Turns on one device: the llm's engine thread steps, the encoder's batcher runs granted slices between."""

    def __init__(self, budget: SliceBudget, clock: Callable[[], float] = time.perf_counter, *,
                 overlap_threads: int = 0, llm_threads: int = 0, set_llm_threads: Callable[[int], None] = None,
                 streams=None):
        self.budget = budget
        self.clock = clock
        # CPU overlap: while decodes run a slice runs beside the steps on overlap_threads of the llm_threads, the
        # steps on the rest (set_llm_threads, called in the engine thread: torch's thread count is per thread).
        self.overlap_threads = overlap_threads if overlap_threads < llm_threads else 0
        self.llm_threads = llm_threads
        self.set_llm_threads = set_llm_threads
        self._num_llm_threads = llm_threads
        # GPU: the roles' CUDA streams (services/unified/gpu.RoleStreams); slices run beside the steps, bounded.
        self.streams = streams
        self.encoder_stream = streams.encoder if streams is not None else None  # the batcher runs slices on it
        self._is_llm_thread_set = streams is None
        self._num_steps_since_side = 1  # GPU: one bounded slice beside each llm step
        self._cond = threading.Condition()
        self._holder: object | None = None  # "llm", a SliceRequest, or None when the device is free
        self._side: SliceRequest | None = None  # a slice running beside the llm's steps (overlap)
        self._pending: SliceRequest | None = None
        self._num_llm_waiting = 0  # a step waiting for the device goes before the next slice
        self._prefill_deadline = math.inf  # the device is kept for the llm's next step while a slice is due later
        self._step_started = 0.0
        self._snapshot = (0, True)

    # The llm's side (its engine thread) ----------------------------------------------------------

    def acquire_step(self, scheduler) -> None:
        """Blocks while an encoder slice runs, then holds the device for one llm step."""
        if not self._is_llm_thread_set:  # the engine thread's first step: its CUDA stream, once
            self.streams.use_llm()
            self._is_llm_thread_set = True
        with self._cond:
            asked = self.clock()
            self._num_llm_waiting += 1
            while self._holder is not None:
                self._cond.wait()
            self._num_llm_waiting -= 1
            self._holder = "llm"
            self._prefill_deadline = math.inf
            self._step_started = self.clock()
            metrics.WAIT_SECONDS.labels("llm").observe(self._step_started - asked)
            num_threads = self.llm_threads - (self.overlap_threads if self._side is not None else 0)
        if self.set_llm_threads is not None and num_threads != self._num_llm_threads:
            self.set_llm_threads(num_threads)
            self._num_llm_threads = num_threads
        num_decodes = _num_decoding(scheduler)
        self._snapshot = (num_decodes, num_decodes == len(scheduler.running) and not scheduler.waiting)

    def release_step(self, scheduler, will_step_again: bool = False) -> None:
        """The step is done: report it and hand the device to a waiting slice if the budget and deadlines allow
        (will_step_again: the engine steps at once, so prefill work it leaves may keep the device)."""
        num_decodes, is_decode_only = self._snapshot
        prefill_deadline = _prefill_deadline(scheduler) if will_step_again else math.inf
        with self._cond:
            step_s = self.clock() - self._step_started
            metrics.DEVICE_SECONDS.labels("llm").inc(step_s)
            try:
                self.budget.on_step(StepReport(step_s * 1e3, num_decodes, is_decode_only, _num_decoding(scheduler)))
            except Exception:  # a pricing bug must cost encoder throughput, never the llm's engine thread
                log.exception("arbiter: step report failed")
            self._holder = None
            self._prefill_deadline = prefill_deadline
            self._num_steps_since_side += 1
            self._grant_pending()
            self._cond.notify_all()

    # The encoder's side (its batcher) -------------------------------------------------------------

    def request_slice(self, first_patches: int, on_grant: Callable[[int], None],
                      deadline: float = math.inf) -> SliceRequest:
        """Asks for a turn for a slice whose first item has first_patches; granted now or after an llm step."""
        request = SliceRequest(first_patches, on_grant, self.clock(), deadline)
        with self._cond:
            if self._pending is not None:
                raise RuntimeError("arbiter: one slice request at a time")
            self._pending = request
            self._grant_pending()
        return request

    @contextlib.asynccontextmanager
    async def slice(self, first_patches: int, deadline: float = math.inf):
        """Awaits a turn (the SliceRequest, with max_patches) and frees the device on leaving, charging num_patches."""
        loop = asyncio.get_running_loop()
        granted = loop.create_future()

        def deliver(_max_patches: int) -> None:  # on the event loop
            if granted.cancelled():
                self.release_slice(request)  # the batcher stopped waiting: the device goes straight back
            else:
                granted.set_result(None)

        request = self.request_slice(first_patches, lambda n: loop.call_soon_threadsafe(deliver, n), deadline)
        try:
            await granted
            yield request
        finally:
            self.cancel(request)  # releases a granted slice (idempotent), forgets one still waiting

    def release_slice(self, request: SliceRequest) -> None:
        """The slice is done (or was granted and not used, num_patches 0): charge it and free the device."""
        with self._cond:
            if request.is_released or not request.is_granted:
                return
            request.is_released = True
            slice_s = self.clock() - request.granted_at if request.num_patches else 0.0
            metrics.DEVICE_SECONDS.labels("encoder").inc(slice_s)
            if request is self._side:  # on cores of its own: it took nothing from the steps, nor ran at full width
                self._side = None
                return
            self.budget.on_slice(request.num_patches, slice_s * 1e3)
            self._holder = None
            self._cond.notify_all()

    def cancel(self, request: SliceRequest) -> None:
        """The slice will not run: forget it if it waits, free the device if it was granted."""
        with self._cond:
            if self._pending is request:
                self._pending = None
                return
        self.release_slice(request)

    def _grant_pending(self) -> None:
        request = self._pending
        if request is None:
            return
        if (self.overlap_threads or self.streams is not None) and self.budget.num_running:
            if self._holder not in (None, "llm") or self._side is not None:
                return
            if self.streams is not None:  # a low-priority stream: a bounded slice per llm step
                if not self._num_steps_since_side:
                    return
                self._num_steps_since_side = 0
                max_patches = self.budget.max_side_patches(request.first_patches)
            else:  # beside the steps, which drop to the other threads from their next one
                max_patches, request.num_threads = UNLIMITED, self.overlap_threads
            self._side = request
        else:
            if self._holder is not None or self._num_llm_waiting or self._prefill_deadline < request.deadline:
                return
            max_patches = self.budget.max_patches(request.first_patches)
            if not max_patches:
                self.budget.num_deferred += 1
                metrics.SLICES_DEFERRED.inc()
                return
            self.budget.num_deferred = 0
            self._holder = request
        self._pending = None
        request.is_granted = True
        request.max_patches = max_patches
        request.granted_at = self.clock()
        metrics.WAIT_SECONDS.labels("encoder").observe(request.granted_at - request.asked_at)
        request.on_grant(max_patches)


def _num_decoding(scheduler) -> int:
    """Running sequences that decode at the next step. Not one waiting for its media's next chunk (streamed
    prefill): it runs no step until the chunk comes, and that chunk may be the slice waiting for the device."""
    return sum(1 for s in scheduler.running if s.num_uncomputed_tokens == 1)


def _prefill_deadline(scheduler) -> float:
    """The earliest priority (the router's deadline) among sequences with prompt left that can run now."""
    return min((s.priority for s in (*scheduler.running, *scheduler.waiting)
                if s.num_uncomputed_tokens > 1 and s.num_schedulable_tokens), default=math.inf)
