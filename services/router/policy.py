"""SLO policy of the router: request classes, predicted TTFT, admission, least-slack ordering (plain Python)."""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import math


@dataclasses.dataclass(frozen=True)
class Slo:
    ttft_ms: float
    tpot_ms: float


@dataclasses.dataclass(frozen=True)
class SloDefaults:
    """Default SLOs by request class: the heaviest media item decides the class."""

    video: Slo
    image: Slo
    text: Slo

    def for_request(self, kinds: list[str], ttft_ms: float = 0.0, tpot_ms: float = 0.0) -> tuple[str, Slo]:
        """The request class and its SLO; a request's own nonzero targets win."""
        cls = "video" if "video" in kinds else "image" if "image" in kinds else "text"
        default = getattr(self, cls)
        return cls, Slo(ttft_ms or default.ttft_ms, tpot_ms or default.tpot_ms)


@dataclasses.dataclass(frozen=True)
class StageTimes:
    """Predicted milliseconds of one stage for one request: waiting behind more urgent work, then working."""

    wait_ms: float = 0.0
    work_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        return self.wait_ms + self.work_ms


@dataclasses.dataclass(frozen=True)
class Prediction:
    media: StageTimes  # decode and encode of every media item not in the cache
    llm: StageTimes  # queue and prefill
    step_ms: float  # one decode step of the llm at its predicted batch size
    # Streamed prefill: the chunks the media flow through the stages in (0: store-and-forward, the stages add up),
    # and the decoder's share of media.work_ms (the rest is the encoders').
    num_chunks: int = 0
    decode_ms: float = 0.0

    @property
    def ttft_ms(self) -> float:
        return self.media.wait_ms + self.llm.wait_ms + self.work_ms

    @property
    def work_ms(self) -> float:
        """Decode, encode and prefill: their sum, or streamed, the pipeline's time (pipelined_ms)."""
        if not self.num_chunks:
            return self.media.work_ms + self.llm.work_ms
        return pipelined_ms((self.decode_ms, self.media.work_ms - self.decode_ms, self.llm.work_ms), self.num_chunks)

    @property
    def media_share_ms(self) -> float:
        """What the media work adds to the time to first token (all of it store-and-forward)."""
        return self.work_ms - self.llm.work_ms


def pipelined_ms(stage_ms: tuple[float, ...], num_chunks: int) -> float:
    """Stages that pass num_chunks chunks along as each is done: the slowest stage's total, plus one chunk of each
    other stage (the first chunk must reach the slowest, the last must leave it), not the sum of the stages."""
    slowest = max(stage_ms)
    return slowest + (sum(stage_ms) - slowest) / max(1, num_chunks)


@dataclasses.dataclass(frozen=True)
class Decision:
    admit: bool
    reason: str = ""
    retry_after_ms: float = 0.0
    # Fraction of the requested video frames to keep (1.0: as asked) when degradation was accepted.
    frame_scale: float = 1.0


def decide(prediction: Prediction, slo: Slo, *, allow_degrade: bool, headroom: float = 1.0, ttft_scale: float = 1.0,
           tpot_scale: float = 1.0, min_frame_scale: float = 0.125) -> Decision:
    """Admit when the request can meet its TTFT and TPOT targets if started now; else refuse or degrade.

    The predictions, times their scales (Calibration), must fit within headroom times the targets.
    A refused request gets a retry hint: how long until the backlog ahead of it has drained enough.
    A request that accepts degradation keeps fewer video frames, which shrinks decode and encode.
    """
    budget = slo.ttft_ms * headroom
    step_ms, ttft_ms = prediction.step_ms * tpot_scale, prediction.ttft_ms * ttft_scale
    if step_ms > slo.tpot_ms * headroom:
        return Decision(False, f"predicted time per token {_predicted(prediction.step_ms, tpot_scale)} exceeds "
                               f"{_limit(slo.tpot_ms, headroom)}",
                        retry_after_ms=retry_ms(prediction.llm.wait_ms * ttft_scale))
    if ttft_ms <= budget:
        return Decision(True)
    media_ms = prediction.media_share_ms * ttft_scale
    fixed = ttft_ms - media_ms
    if allow_degrade and media_ms > 0 and fixed < budget:
        scale = (budget - fixed) / media_ms
        if scale >= min_frame_scale:
            return Decision(True, "degraded", frame_scale=scale)
    return Decision(False, f"predicted time to first token {_predicted(prediction.ttft_ms, ttft_scale)} exceeds "
                           f"{_limit(slo.ttft_ms, headroom)}", retry_after_ms=retry_ms(ttft_ms - budget))


class Calibration:
    """How far off one kind of prediction turns out: quantiles of actual / predicted over recent outcomes.

    Predictions are biased in ways no cost model sees (processes sharing cores, requests admitted later
    slowing the earlier ones down), so admitting right up to the target would make about half the
    borderline requests miss. A prediction times the q-quantile of these ratios is one that q of recent
    requests stayed within. A new router has only its warm-up to go on (and may be met by a burst): it starts
    from min_samples outcomes of start_scale, which real outcomes displace one by one. (Counting start_scale
    until all min_samples were in kept a rare class, a video among the texts, at twice its prediction for
    minutes, and a refusal is a miss for sure.) floor_ms keeps near-zero predictions (a cache hit) from turning
    one slow request into a huge ratio.

    A quantile is only as good as the outcomes above it: the 0.95-quantile of 20 ratios is the largest one,
    so a single noisy outcome (a request stalled by a busy neighbour) would scale every prediction by its
    ratio, and refusing on it is a miss for sure. The scale is therefore never above the min_tail-th largest
    ratio: it takes min_tail outcomes that slow to move it there, while a sustained under-prediction, which
    shows in most outcomes, is corrected in full.
    """

    def __init__(self, *, window: int = 200, min_samples: int = 10, start_scale: float = 2.0,
                 floor_ms: float = 5.0, bounds: tuple[float, float] = (0.25, 20.0), min_tail: int = 4):
        self.min_samples, self.start_scale, self.floor_ms, self.bounds = min_samples, start_scale, floor_ms, bounds
        self.min_tail = min_tail
        self._ratios: collections.deque[float] = collections.deque(maxlen=window)
        self._sorted: list[float] = []

    def observe(self, predicted_ms: float, actual_ms: float) -> None:
        self._ratios.append((actual_ms + self.floor_ms) / (predicted_ms + self.floor_ms))
        self._sorted = sorted(self._ratios)

    def scale(self, quantile: float) -> float:
        ratios = self._sorted
        if len(ratios) < self.min_samples:
            ratios = sorted([*ratios, *[self.start_scale] * (self.min_samples - len(ratios))])
        num = len(ratios)
        # quantile of them are within it, and at least min_tail of them reach it
        ratio = ratios[max(0, min(math.ceil(quantile * num) - 1, num - self.min_tail))]
        return min(self.bounds[1], max(self.bounds[0], ratio))


class Strictness:
    """Which quantile of the calibration admission plans for, moved by outcomes until target of the
    admitted requests meet their SLO.

    Planning every request for its own target-quantile would be far too strict: most requests are nowhere
    near their targets and meet them whatever the error, so the share that meets would be ~100% while
    borderline requests that would have made it are refused (a fifth of all requests in one light run).
    Each miss raises the quantile and each success lowers it, by amounts that balance exactly when 1 -
    target of the outcomes miss; it stays within [low, high]. A miss moves it target / (1 - target) times
    as far as a success (19 times at 0.95): an overload sends misses in a burst, a quiet spell relaxes it
    request by request. It starts at the median, not strict: a refusal is a miss for the user, so until
    outcomes say otherwise only a request predicted to miss at the typical error is refused (starting at
    0.95, a new router below capacity refused 6-25% of its first hundred requests while fcfs, refusing
    none, met the SLO for 93-95%); an overload's first five misses raise it to 0.95.
    """

    def __init__(self, target: float, *, start: float = 0.5, low: float = 0.5, high: float = 0.99,
                 rate: float = 0.1):
        self.target, self.low, self.high, self.rate = target, low, high, rate
        self.value = min(high, max(low, start))

    def observe(self, met: bool) -> None:
        missed = 0.0 if met else 1.0
        self.value = min(self.high, max(self.low, self.value + self.rate * (missed - (1 - self.target))))


def _predicted(raw_ms: float, scale: float) -> str:
    """A calibrated prediction as a refusal states it: how it was made, unless the calibration is 1."""
    calibrated = f"{raw_ms * scale:.0f} ms"
    return calibrated if scale == 1.0 else f"{calibrated} ({raw_ms:.0f} ms × {scale:.2f} calibration)"


def _limit(target_ms: float, headroom: float) -> str:
    """What a prediction was held to: the target, or headroom times it (then a prediction under the target
    can still be refused, and the message must say why)."""
    target = f"the {target_ms:.0f} ms target"
    return target if headroom == 1.0 else f"{target_ms * headroom:.0f} ms ({headroom:.2f} × {target})"


def retry_ms(ms: float) -> float:
    """A retry hint of about ms: in steps of 50 ms, at least 50."""
    return float(max(50, math.ceil(ms / 50) * 50))


def degraded_frames(max_frames: int, scale: float, *, min_frames: int = 4) -> int:
    """An even frame cap, scale times the original, never below min_frames."""
    frames = max(min_frames, int(max_frames * scale))
    return frames - frames % 2


@dataclasses.dataclass
class Job:
    """A request's outstanding work at one stage pool."""

    deadline: float  # seconds, monotonic clock: the TTFT deadline
    work_ms: float


class Backlog:
    """The predicted work outstanding at one stage pool, to price the wait of a new request.

    Work is served least-slack first, so a new request waits only for jobs due no later than it.
    """

    def __init__(self) -> None:
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, deadline: float, work_ms: float) -> int:
        job_id = next(self._ids)
        self._jobs[job_id] = Job(deadline, work_ms)
        return job_id

    def remove(self, job_id: int) -> None:
        self._jobs.pop(job_id, None)

    def work_ahead_ms(self, deadline: float) -> float:
        return sum(j.work_ms for j in self._jobs.values() if j.deadline <= deadline)

    def total_ms(self) -> float:
        return sum(j.work_ms for j in self._jobs.values())


class SlackQueue:
    """Waiters ordered by latest start time (deadline minus remaining work), then arrival."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, object]] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, latest_start: float, item: object) -> None:
        heapq.heappush(self._heap, (latest_start, next(self._order), item))

    def pop(self) -> object:
        return heapq.heappop(self._heap)[2]

    def discard(self, item: object) -> None:
        """Removes item if present (a waiter that gave up)."""
        for i, entry in enumerate(self._heap):
            if entry[2] is item:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                return
