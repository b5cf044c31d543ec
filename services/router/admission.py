"""Admission: predicts a request's time to first token from the stage cost models and backlogs, and decides."""

from __future__ import annotations

import dataclasses

from services.router import metrics
from services.router.costs import MediaShape
from services.router.policy import (Backlog, Calibration, Decision, Prediction, Slo, SloDefaults, StageTimes,
                                    Strictness, decide, retry_ms)
from services.router.selection import StageView


@dataclasses.dataclass
class Ticket:
    """One admitted request's place in the backlogs; released as its stages finish."""

    cls: str
    slo: Slo
    calibration: str  # whose errors its prediction is scaled by: its class's, a text's when it needs no media work
    deadline: float  # perf_counter seconds by which the first token is due
    prediction: Prediction
    decision: Decision
    admitted_at: float = float("-inf")
    jobs: dict[str, int] = dataclasses.field(default_factory=dict)
    is_at_llm: bool = False  # holds an llm slot (counted in its replica's num_in_flight) before its first token

    @property
    def latest_start(self) -> float:
        """When the media work must start at the latest to meet the deadline."""
        return self.deadline - self.prediction.ttft_ms / 1e3 + self.prediction.media.wait_ms / 1e3


class Controller:
    """Prices each request against the stage pools; with policy "fcfs" admits everything in arrival order.

    The cost models learn only from admitted work, so a model that came out too pessimistic (fitted on a busy
    machine, or across a stall) would refuse everything forever and never see the evidence against it. When
    nothing is in flight and nothing was admitted for probe_after_s, the next request predicted to miss by
    less than probe_max_ratio is admitted anyway as a probe: it disturbs nobody, and what it measures
    corrects the models (or confirms them). One that misses by more (a 1 ms target) is refused even then.

    Predictions are calibrated by their outcomes (Calibration) at a quantile that the admitted requests'
    outcomes move (Strictness) so that `target` of them meet their SLO: TTFT per request class against what
    admission predicted (waits included; an image or video whose media are all cached counts as a text); time per
    token against the step model at the batch the tokens were actually made in, which measures the model's noise
    only. Against admission's own prediction it would chase itself: every request admitted later makes the earlier
    ones' steps slower, a wider margin admits fewer, and so on down.

    A refusal is a miss for sure, and it helps the others only by keeping its work off the queues they wait in. A
    request predicted to miss its first-token target by its own work alone (little queued ahead of it: at most
    own_work_wait_share of the target), and by less than own_work_max_miss times the target, is admitted: with
    nothing to give back to the queues, refusing it would only turn a likely near miss (the prediction is a
    quantile) into a certain one.
    """

    def __init__(self, decoders: StageView, encoders: StageView, llms: StageView, *,
                 defaults: SloDefaults, policy: str, headroom: float, target: float = 0.95,
                 probe_after_s: float = 5.0, probe_max_ratio: float = 4.0, own_work_wait_share: float = 0.1,
                 own_work_max_miss: float = 1.5):
        self.pools = {"decoder": decoders, "encoder": encoders, "llm": llms}
        self.defaults = defaults
        self.policy = policy
        self.headroom = headroom
        self.ttft_calibration = {cls: Calibration() for cls in ("video", "image", "text")}
        self.tpot_calibration = Calibration()
        self.strictness = Strictness(target)
        self.probe_after_s = probe_after_s
        self.probe_max_ratio = probe_max_ratio
        self.own_work_wait_share, self.own_work_max_miss = own_work_wait_share, own_work_max_miss
        self.backlogs = {stage: Backlog() for stage in self.pools}
        # Tickets in the llm backlog that already hold an llm slot: the replica counts them in num_in_flight.
        self._num_at_llm = 0
        # When the latest admitted request that ran (was not cancelled) was admitted: one whose client went away
        # measured nothing, so it must not postpone a probe. Counted at release: until then it is in flight.
        self._last_admitted = float("-inf")

    def admit(self, kinds: list[str], shapes: list[MediaShape], prompt_tokens: float, *, ttft_ms: float,
              tpot_ms: float, allow_degrade: bool, now: float, num_chunks: int = 0) -> Ticket:
        """A ticket saying whether the request may run; an admitted one is entered in the backlogs. num_chunks:
        the chunks a streamed request's media flow to the llm in (0: store-and-forward)."""
        cls, slo = self.defaults.for_request(kinds, ttft_ms, tpot_ms)
        deadline = now + slo.ttft_ms / 1e3
        prediction = self.predict(shapes, prompt_tokens, deadline, num_chunks)
        # An image or video found in the cache waits on the llm alone, as a text does, and errs as one: counted with
        # the encodes of its class, at 3x capacity (where most media are cached) its outcomes made up most of the
        # image calibration, which scaled the uncached images' predictions by anything from 0.3 to 4.9.
        calibration = cls if any(s.num_frames or s.num_patches for s in shapes) else "text"
        ttft_scale = self.ttft_calibration[calibration].scale(self.strictness.value)
        tpot_scale = self.tpot_calibration.scale(self.strictness.value)
        decision = (Decision(True) if self.policy == "fcfs" else
                    decide(prediction, slo, allow_degrade=allow_degrade, headroom=self.headroom,
                           ttft_scale=ttft_scale, tpot_scale=tpot_scale))
        if not decision.admit and self._misses_by_its_own_work(prediction, slo, ttft_scale, tpot_scale):
            decision = Decision(True, "own work")
        miss_ratio = max(prediction.ttft_ms / slo.ttft_ms, prediction.step_ms / slo.tpot_ms)
        if (not decision.admit and miss_ratio <= self.probe_max_ratio and self._idle()
                and now - self._last_admitted > self.probe_after_s):
            decision = Decision(True, "probe")
            metrics.PROBES.labels(cls).inc()
        ticket = Ticket(cls, slo, calibration, deadline, prediction, decision)
        if decision.admit:
            ticket.admitted_at = now
            scale = decision.frame_scale
            decode, encode = self._media_work(shapes, scale)
            for stage, work in (("decoder", decode), ("encoder", encode), ("llm", prediction.llm.work_ms)):
                ticket.jobs[stage] = self.backlogs[stage].add(deadline, work)
            self._report()
        return ticket

    def finish(self, ticket: Ticket, stage: str) -> None:
        """The ticket's work at this stage is done (or abandoned)."""
        if stage == "llm":
            self.at_llm(ticket, False)
        if (job := ticket.jobs.pop(stage, None)) is not None:
            self.backlogs[stage].remove(job)
            self._report()

    def at_llm(self, ticket: Ticket, is_at_llm: bool) -> None:
        """The ticket took (True) or gave back (False) an llm slot before its first token."""
        if "llm" in ticket.jobs and ticket.is_at_llm != is_at_llm:
            ticket.is_at_llm = is_at_llm
            self._num_at_llm += 1 if is_at_llm else -1

    def record(self, ticket: Ticket, ttft_ms: float, met: bool) -> None:
        """A completed request: its time to first token against what admission predicted for it, and
        whether it met its SLO (probes were expected to miss: they do not move the strictness)."""
        self.ttft_calibration[ticket.calibration].observe(ticket.prediction.ttft_ms, ttft_ms)
        if ticket.decision.reason != "probe":
            self.strictness.observe(met)
        metrics.ADMISSION_QUANTILE.set(self.strictness.value)

    def record_step(self, predicted_ms: float, tpot_ms: float) -> None:
        """A request's time per token against the step model's prediction for the batch it ran in."""
        self.tpot_calibration.observe(predicted_ms, tpot_ms)

    def release(self, ticket: Ticket, *, is_cancelled: bool = False) -> None:
        """The request has ended; one whose client went away leaves admission as if it had never come."""
        for stage in list(ticket.jobs):
            self.finish(ticket, stage)
        if not is_cancelled:
            self._last_admitted = max(self._last_admitted, ticket.admitted_at)

    def retry_after_ms(self) -> float:
        """When to come back after a refusal admission did not price (a stage's queue was full): the work queued
        at the busiest stage, per replica."""
        return retry_ms(max(self._wait_ms(stage, float("inf")) for stage in self.pools))

    def _misses_by_its_own_work(self, prediction: Prediction, slo: Slo, ttft_scale: float,
                                tpot_scale: float) -> bool:
        """Whether a refused request would miss only its first-token target, narrowly, with little queued ahead."""
        waits_ms = (prediction.media.wait_ms + prediction.llm.wait_ms) * ttft_scale
        return (prediction.step_ms * tpot_scale <= slo.tpot_ms * self.headroom
                and waits_ms <= self.own_work_wait_share * slo.ttft_ms
                and prediction.ttft_ms * ttft_scale <= self.own_work_max_miss * slo.ttft_ms * self.headroom)

    def _idle(self) -> bool:
        return not any(self.backlogs.values()) and not any(pool.num_in_flight for pool in self.pools.values())

    def predict(self, shapes: list[MediaShape], prompt_tokens: float, deadline: float,
                num_chunks: int = 0) -> Prediction:
        decode, encode = self._media_work(shapes)
        media_wait = 0.0
        if decode or encode:
            media_wait = max(self._wait_ms("decoder", deadline), self._wait_ms("encoder", deadline))
        llm = self._best("llm", lambda r: r.costs.prefill.predict(prompt_tokens))
        # The batch it will decode in: what runs now, itself, and the admitted requests still on their way
        # (in decode, encode or the llm's queue: counted in the llm backlog until their first token). One already
        # at an llm is in its num_in_flight too: counted twice, a near-capacity stack refused what it could serve.
        coming = (len(self.backlogs["llm"]) - self._num_at_llm) / max(1, len(self.pools["llm"].healthy()))
        step = self._best("llm", lambda r: r.costs.step.predict(r.num_in_flight + coming + 1))
        return Prediction(StageTimes(media_wait, decode + encode),
                          StageTimes(self._wait_ms("llm", deadline), llm), step, num_chunks, decode)

    def _media_work(self, shapes: list[MediaShape], frame_scale: float = 1.0) -> tuple[float, float]:
        decode = sum(self._best("decoder", lambda r, s=s: r.costs.predict(s.num_frames * frame_scale,
                                                                        s.num_pixels * frame_scale))
                     for s in shapes)
        encode = sum(self._best("encoder", lambda r, s=s: r.costs.predict(s.num_patches * frame_scale))
                     for s in shapes)
        return decode, encode

    def _best(self, stage: str, cost) -> float:
        """The predicted cost on the stage's cheapest healthy replica (0 when none is known)."""
        return min((cost(r) for r in self.pools[stage].healthy()), default=0.0)

    def _wait_ms(self, stage: str, deadline: float) -> float:
        """Work due no later than deadline, spread over the stage's healthy replicas."""
        replicas = max(1, len(self.pools[stage].healthy()))
        return self.backlogs[stage].work_ahead_ms(deadline) / replicas

    def _report(self) -> None:
        for stage, backlog in self.backlogs.items():
            metrics.BACKLOG_MS.labels(stage).set(backlog.total_ms())
