"""Decode planning in plain Python: sampled frames → keyframe spans → contiguous chunks, balanced by decode cost or
fixed windows of sampled frames."""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmserve.media.probe import VideoInfo


@dataclasses.dataclass(frozen=True)
class VideoIndex:
    """Probe facts plus each video packet's pts and keyframe flag, in decode order (no pixels decoded)."""

    info: VideoInfo
    pts: list[int | None]
    is_key: list[bool]
    has_discarded: bool  # packets the demuxer marks to drop (edit lists): frame counts then differ


class PlanError(ValueError):
    """The packet index cannot be planned from (missing or repeated timestamps); decode sequentially instead."""


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Relative costs, in units of one decoded packet."""

    per_packet: float = 1.0
    # RGB conversion and the model's resize of one kept frame (about 5 packets at 720p on one core).
    per_frame: float = 5.0
    # Seek, demux to the keyframe and decoder flush for each extra span.
    per_span: float = 3.0
    # A chunk cheaper than this is not worth its own worker task.
    min_chunk: float = 30.0


@dataclasses.dataclass(frozen=True)
class Span:
    """Packets [start, stop) in decode order, decoded from the keyframe at start (pts key_pts)."""

    start: int
    stop: int
    key_pts: int


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Output frames [first, first + len(frame_indices)) and the spans that decode them."""

    index: int
    first: int
    frame_indices: tuple[int, ...]
    frame_pts: tuple[int, ...]
    spans: tuple[Span, ...]
    cost: float


def presentation_order(pts: Sequence[int | None]) -> list[int]:
    """Decode positions sorted by presentation time: entry i is where the i-th shown frame sits in the stream."""
    if any(p is None for p in pts):
        raise PlanError("video: packets without timestamps")
    order = sorted(range(len(pts)), key=pts.__getitem__)
    if any(pts[a] == pts[b] for a, b in zip(order, order[1:])):
        raise PlanError("video: repeated packet timestamps")
    return order


def start_positions(is_key: Sequence[bool], order: Sequence[int]) -> list[int]:
    """For each presentation index, the decode position of the keyframe to start decoding it from.

    A frame belongs to the last keyframe shown before it, which also covers open-GOP leading frames (shown
    before their keyframe but decoded after it, referencing the previous GOP): they start at the previous
    keyframe and their span runs on past the next one. Malformed orders fall back to the last keyframe in
    decode order, or to the stream start.
    """
    keys = [d for d, k in enumerate(is_key) if k]
    starts, current = [], None
    for d in order:
        if is_key[d]:
            current = d
        if current is None or current > d:
            i = bisect.bisect_right(keys, d)
            starts.append(keys[i - 1] if i else 0)
        else:
            starts.append(current)
    return starts


class _CostMeter:
    """Cost of decoding a growing run of targets, merging overlapping keyframe spans."""

    def __init__(self, costs: CostModel):
        self.costs = costs
        self.spans: list[tuple[int, int]] = []  # (start, last) decode positions, inclusive
        self.num_frames = 0
        self.num_closed_packets = 0  # packets in every span but the last

    def add(self, start: int, end: int) -> None:
        self.num_frames += 1
        if self.spans and self.spans[-1][0] <= start <= self.spans[-1][1] + 1:
            # The keyframe lies inside the current span (or right after it): keep decoding, no seek.
            first, last = self.spans[-1]
            self.spans[-1] = (first, max(last, end))
        else:
            if self.spans:
                self.num_closed_packets += self.spans[-1][1] - self.spans[-1][0] + 1
            self.spans.append((start, end))

    def snapshot(self) -> tuple:
        return len(self.spans), self.spans[-1] if self.spans else None, self.num_frames, self.num_closed_packets

    def restore(self, state: tuple) -> None:
        num_spans, last, self.num_frames, self.num_closed_packets = state
        del self.spans[num_spans:]
        if last is not None:
            self.spans[-1] = last

    @property
    def cost(self) -> float:
        c = self.costs
        packets = self.num_closed_packets + (self.spans[-1][1] - self.spans[-1][0] + 1 if self.spans else 0)
        return packets * c.per_packet + self.num_frames * c.per_frame + max(0, len(self.spans) - 1) * c.per_span


def _range_cost(starts: Sequence[int], ends: Sequence[int], a: int, b: int, costs: CostModel) -> float:
    meter = _CostMeter(costs)
    for t in range(a, b):
        meter.add(starts[t], ends[t])
    return meter.cost


def _greedy_cuts(starts, ends, limit: float, step: int, costs: CostModel) -> list[int]:
    """Cut points (output positions, multiples of step) making each chunk as long as fits under limit."""
    n, cuts, a = len(starts), [], 0
    while a < n:
        meter, b = _CostMeter(costs), a
        while b < n:
            state, nb = meter.snapshot(), min(n, b + step)
            for t in range(b, nb):
                meter.add(starts[t], ends[t])
            if b > a and meter.cost > limit:
                meter.restore(state)
                break
            b = nb
        cuts.append(b)
        a = b
    return cuts


def split_outputs(starts: Sequence[int], ends: Sequence[int], num_chunks: int, costs: CostModel,
                  step: int = 2) -> list[tuple[int, int]]:
    """Split outputs into at most num_chunks contiguous ranges, cut at multiples of step, minimising the costliest.

    Output t needs packets starts[t]..ends[t] (decode positions). Bisects on the cost limit, filling chunks
    greedily (near-optimal: a range's cost grows as it widens, except where a merged span saves a seek).
    """
    n = len(starts)
    if n == 0:
        return []
    total = _range_cost(starts, ends, 0, n, costs)
    num_chunks = max(1, min(num_chunks, math.ceil(n / step), int(total // max(costs.min_chunk, 1e-9)) or 1))
    if num_chunks == 1:
        return [(0, n)]
    low, high = 0.0, total
    best = [n]
    for _ in range(40):
        mid = (low + high) / 2
        cuts = _greedy_cuts(starts, ends, mid, step, costs)
        if len(cuts) <= num_chunks:
            high, best = mid, cuts
        else:
            low = mid
        if high - low < 0.5:
            break
    return [(a, b) for a, b in zip([0, *best[:-1]], best)]


def window_ranges(num_frames: int, window: int, step: int = 2) -> list[tuple[int, int]]:
    """Outputs [k*window, (k+1)*window) for each k, the last shorter: the same cuts whatever decodes them.
    ValueError unless window is a positive multiple of step (the model's temporal group)."""
    if window < 1 or window % step:
        raise ValueError(f"chunk_frames: {window} is not a positive multiple of the model's temporal group "
                         f"({step} frames)")
    return [(a, min(a + window, num_frames)) for a in range(0, num_frames, window)]


def select_chunks(num_chunks: int, indices: Sequence[int]) -> list[int]:
    """The chunk indices to decode, ascending and once each (empty: all); ValueError for one out of range."""
    if not indices:
        return list(range(num_chunks))
    wanted = sorted(set(indices))
    if wanted[-1] >= num_chunks:
        raise ValueError(f"chunk_indices: {wanted[-1]} is out of range for a plan of {num_chunks} chunks")
    return wanted


def plan_chunks(pts: Sequence[int | None], is_key: Sequence[bool], targets: Sequence[int], num_chunks: int,
                costs: CostModel = CostModel(), step: int = 2, window: int = 0) -> list[Chunk]:
    """Chunks decoding the frames at presentation indices targets (ascending), each a multiple of step frames
    (the model's temporal group) but the last: fixed windows of window frames when window > 0, else at most
    num_chunks chunks balanced by cost.

    pts and is_key describe the stream's packets in decode order. Frames are matched by pts, so B-frames and
    open GOPs cannot shift them. A window that starts mid-GOP decodes from the keyframe before it and keeps only
    its own frames. Raises PlanError when the index cannot be trusted.
    """
    if any(b < a for a, b in zip(targets, targets[1:])):
        raise ValueError("targets must be ascending")
    if targets and not 0 <= targets[0] <= targets[-1] < len(pts):
        raise PlanError(f"video: frame {targets[-1]} requested from a stream of {len(pts)} packets")
    order = presentation_order(pts)
    starts_by_frame = start_positions(is_key, order)
    starts = [starts_by_frame[i] for i in targets]
    ends = [order[i] for i in targets]
    chunks = []
    ranges = window_ranges(len(targets), window, step) if window else split_outputs(starts, ends, num_chunks,
                                                                                   costs, step)
    for index, (a, b) in enumerate(ranges):
        meter = _CostMeter(costs)
        for t in range(a, b):
            meter.add(starts[t], ends[t])
        spans = tuple(Span(first, last + 1, pts[first]) for first, last in meter.spans)
        chunks.append(Chunk(index, a, tuple(targets[a:b]), tuple(pts[order[i]] for i in targets[a:b]), spans,
                            meter.cost))
    return chunks


def workers_for_request(num_workers: int, num_active: int) -> int:
    """Workers one request may fan out to: all of them when alone, an even share (at least one) under load."""
    return max(1, num_workers // max(1, num_active))
