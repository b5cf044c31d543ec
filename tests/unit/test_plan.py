"""Decode planning: targets → keyframe spans → even, contiguous, cost-balanced chunks (pure Python)."""

from __future__ import annotations

import random

import pytest

from mmserve.media.plan import (
    CostModel,
    PlanError,
    plan_chunks,
    presentation_order,
    split_outputs,
    start_positions,
    workers_for_request,
)

NO_MIN = CostModel(min_chunk=0.0)


def closed_gops(num_frames: int, gop: int) -> tuple[list[int], list[bool]]:
    """No B-frames: decode order is presentation order."""
    return list(range(num_frames)), [i % gop == 0 for i in range(num_frames)]


def bframe_gops(num_gops: int, gop: int, open_gop: bool = False) -> tuple[list[int], list[bool]]:
    """Decode-order pts of GOPs 'I P B B P B B ...'; with open_gop, each later I is followed by two leading
    B-frames that are shown before it (they reference the previous GOP's last P and this I)."""
    pts, keys = [], []
    for g in range(num_gops):
        base = g * gop
        if open_gop and g > 0:
            pts += [base + 2, base, base + 1]  # I shown at base+2, leading Bs at base, base+1
            keys += [True, False, False]
            shown = 3
        else:
            pts.append(base)
            keys.append(True)
            shown = 1
        while shown < gop:
            group = min(3, gop - shown)
            last = base + shown + group - 1
            pts += [last, *range(base + shown, last)]  # the P first, then the Bs it anchors
            keys += [False] * group
            shown += group
    return pts, keys


def check_chunks(chunks, pts, is_key, targets):
    """Chunks are contiguous, even, cover every target once, and each span decodes its targets from a keyframe."""
    order = presentation_order(pts)
    starts = start_positions(is_key, order)
    assert [i for c in chunks for i in c.frame_indices] == list(targets)
    first = 0
    for n, c in enumerate(chunks):
        assert (c.index, c.first) == (n, first)
        first += len(c.frame_indices)
        if n < len(chunks) - 1:
            assert len(c.frame_indices) % 2 == 0
        assert [s.start for s in c.spans] == sorted(s.start for s in c.spans)
        for i, p in zip(c.frame_indices, c.frame_pts):
            d = order[i]
            assert pts[d] == p == sorted(pts)[i]
            span = next(s for s in c.spans if s.start <= d < s.stop)
            # Decoding begins at or before the frame's keyframe and never after it, so no reference is missing.
            assert span.start <= starts[i] and span.key_pts == pts[span.start]
            assert is_key[span.start] or span.start == 0


def test_presentation_order_and_errors():
    assert presentation_order([0, 3, 1, 2]) == [0, 2, 3, 1]
    with pytest.raises(PlanError, match="without timestamps"):
        presentation_order([0, None, 2])
    with pytest.raises(PlanError, match="repeated"):
        presentation_order([0, 1, 1])


def test_closed_gops_decode_only_to_the_last_target():
    pts, keys = closed_gops(300, 30)
    targets = [0, 10, 95, 200]  # GOPs 0, 3 and 6; the rest hold no target
    (chunk,) = plan_chunks(pts, keys, targets, num_chunks=1)
    assert [(s.start, s.stop) for s in chunk.spans] == [(0, 11), (90, 96), (180, 201)]
    assert chunk.frame_pts == (0, 10, 95, 200)
    check_chunks([chunk], pts, keys, targets)


def test_bframes_map_targets_by_pts():
    pts, keys = bframe_gops(num_gops=4, gop=30)
    targets = list(range(0, 120, 7))
    chunks = plan_chunks(pts, keys, targets, num_chunks=3, costs=NO_MIN)
    check_chunks(chunks, pts, keys, targets)
    assert len(chunks) == 3


def test_open_gop_leading_frames_start_at_the_previous_keyframe():
    pts, keys = bframe_gops(num_gops=3, gop=30, open_gop=True)
    # Frame 30 is a leading B of the second I (decoded after it, shown before it): it needs the first GOP.
    i_pos = pts.index(32)
    lead_pos = pts.index(30)
    assert keys[i_pos] and lead_pos == i_pos + 1
    (chunk,) = plan_chunks(pts, keys, [30], num_chunks=1)
    assert [(s.start, s.stop) for s in chunk.spans] == [(0, lead_pos + 1)]
    (chunk,) = plan_chunks(pts, keys, [32, 40], num_chunks=1)
    assert chunk.spans[0].start == i_pos
    check_chunks([chunk], pts, keys, [32, 40])


def test_chunks_are_even_and_balanced():
    pts, keys = closed_gops(1800, 30)
    targets = [round(i * 1799 / 119) for i in range(120)]
    chunks = plan_chunks(pts, keys, targets, num_chunks=4)
    check_chunks(chunks, pts, keys, targets)
    assert len(chunks) == 4
    costs = [c.cost for c in chunks]
    assert max(costs) <= 1.1 * min(costs)


def test_long_gops_may_cut_inside_a_gop():
    # One 250-frame GOP holds every target: two chunks both decode from its keyframe, the second further.
    pts, keys = closed_gops(250, 250)
    targets = list(range(0, 250, 25))
    chunks = plan_chunks(pts, keys, targets, num_chunks=2, costs=NO_MIN)
    check_chunks(chunks, pts, keys, targets)
    assert [c.spans[0].start for c in chunks] == [0, 0]
    assert chunks[0].spans[0].stop < chunks[1].spans[0].stop


def test_small_jobs_stay_one_chunk():
    pts, keys = closed_gops(60, 30)
    assert len(plan_chunks(pts, keys, [0, 20, 39, 59], num_chunks=8, costs=CostModel(min_chunk=1000))) == 1
    assert len(plan_chunks(pts, keys, [0, 20, 39, 59], num_chunks=8, costs=NO_MIN)) == 2  # even: at most 2


def test_no_keyframe_before_a_frame_starts_at_the_stream_start():
    pts, keys = [0, 1, 2, 3], [False, False, True, False]
    assert start_positions(keys, presentation_order(pts)) == [0, 0, 2, 2]
    (chunk,) = plan_chunks(pts, keys, [1, 3], num_chunks=1)
    check_chunks([chunk], pts, keys, [1, 3])


def test_split_outputs_respects_the_step():
    starts, ends = [0] * 6, [0, 10, 20, 30, 40, 50]
    ranges = split_outputs(starts, ends, 3, NO_MIN)
    assert all((b - a) % 2 == 0 for a, b in ranges)
    assert ranges[0][0] == 0 and ranges[-1][1] == 6


@pytest.mark.parametrize("seed", range(20))
def test_random_streams(seed):
    rng = random.Random(seed)
    pts, keys = bframe_gops(num_gops=rng.randint(1, 8), gop=rng.choice([4, 12, 30]), open_gop=rng.random() < 0.5)
    n = len(pts)
    targets = sorted(rng.sample(range(n), rng.randint(1, min(n, 40))))
    chunks = plan_chunks(pts, keys, targets, num_chunks=rng.randint(1, 6), costs=NO_MIN)
    check_chunks(chunks, pts, keys, targets)


def test_workers_for_request():
    assert workers_for_request(8, 1) == 8
    assert workers_for_request(8, 0) == 8
    assert workers_for_request(8, 3) == 2
    assert workers_for_request(8, 20) == 1
