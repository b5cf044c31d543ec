"""Fixed chunk windows and chunk subsets (issue 23): cuts at multiples of the window, whatever the worker count."""

from __future__ import annotations

import pytest

from mmserve.media.plan import CostModel, plan_chunks, select_chunks, window_ranges
from tests.unit.test_plan import bframe_gops, check_chunks, closed_gops


def test_windows_ignore_the_worker_count_and_costs():
    pts, keys = bframe_gops(num_gops=5, gop=30, open_gop=True)
    targets = list(range(0, 150, 3))  # 50 sampled frames
    plans = [plan_chunks(pts, keys, targets, num_chunks=n, costs=costs, window=8)
             for n in (1, 3, 16) for costs in (CostModel(), CostModel(min_chunk=0.0, per_span=50.0))]
    assert all(plan == plans[0] for plan in plans)
    chunks = plans[0]
    assert [(c.first, len(c.frame_indices)) for c in chunks] == [(k * 8, 8) for k in range(6)] + [(48, 2)]
    assert [c.frame_indices for c in chunks] == [tuple(targets[k:k + 8]) for k in range(0, 50, 8)]
    check_chunks(chunks, pts, keys, targets)


def test_a_window_starting_mid_gop_decodes_from_the_keyframe_before_it():
    pts, keys = closed_gops(120, 30)
    chunks = plan_chunks(pts, keys, list(range(0, 120, 5)), num_chunks=2, window=4)  # frames 20, 40, 60, ...
    window = chunks[1]  # frames 20, 25, 30, 35: from GOP 0's keyframe, dropping 0..19, then GOP 1's
    assert window.frame_indices == (20, 25, 30, 35)
    assert [(s.start, s.stop) for s in window.spans] == [(0, 26), (30, 36)]
    assert chunks[2].spans[0].start == 30  # frames 40..55 start at the keyframe of GOP 1, mid-GOP
    check_chunks(chunks, pts, keys, list(range(0, 120, 5)))


def test_window_must_be_a_multiple_of_the_temporal_group():
    assert window_ranges(10, 4, step=2) == [(0, 4), (4, 8), (8, 10)]
    assert window_ranges(3, 1, step=1) == [(0, 1), (1, 2), (2, 3)]
    assert window_ranges(4, 8, step=2) == [(0, 4)]
    for window in (3, 0, -2):
        with pytest.raises(ValueError, match=rf"chunk_frames: {window} is not a positive multiple .* \(2 frames\)"):
            window_ranges(10, window, step=2)
    pts, keys = closed_gops(60, 30)
    with pytest.raises(ValueError, match="chunk_frames"):
        plan_chunks(pts, keys, list(range(0, 60, 2)), num_chunks=2, step=2, window=5)


def test_chunk_subsets():
    assert select_chunks(4, []) == [0, 1, 2, 3]
    assert select_chunks(4, [3, 1, 3]) == [1, 3]
    with pytest.raises(ValueError, match="chunk_indices: 4 is out of range for a plan of 4 chunks"):
        select_chunks(4, [0, 4])
