"""Chunked decode (seek to keyframes, decode only what the plan says) gives exactly decode_video's frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmserve.media import MediaError
from mmserve.media.chunked import decode_chunk
from mmserve.media.plan import CostModel, Span, plan_chunks
from mmserve.media.samples import make_video
from mmserve.media.video import decode_video, index_video
from mmserve.models.family import planning_family
from services.decoder.engine import VideoOptions, plan_video

SMALL = 28 * 28 * 4
BFRAMES = {"x264-params": "bframes=3:b-adapt=0:b-pyramid=normal"}
OPEN_GOP = {"x264-params": "bframes=3:b-adapt=0:open-gop=1:keyint=15:min-keyint=15:scenecut=0"}
CLIPS = {
    "h264 B-frames": dict(codec="h264", gop=15, encoder_options=BFRAMES),
    "h264 open GOP": dict(codec="h264", gop=15, encoder_options=OPEN_GOP),
    "h264 mkv B-frames": dict(codec="h264", gop=15, container="mkv", encoder_options=BFRAMES),
    "hevc B-frames": dict(codec="hevc", gop=15, encoder_options={
        "x265-params": "log-level=none:pools=1:frame-threads=1:bframes=3:b-adapt=0:open-gop=1"}),
    "vp9 webm": dict(codec="vp9", gop=15, container="webm"),
    "av1 mkv": dict(codec="av1", gop=15, container="mkv"),
}


@pytest.fixture(scope="module", params=list(CLIPS))
def clip(request):
    return make_video(seconds=2.0, fps=30, width=112, height=84, **CLIPS[request.param])


def chunked(data: bytes, fps: float, num_chunks: int, skip_nonref: bool = True):
    index = index_video(data, max_frames=10_000, max_seconds=60)
    plan = plan_video(index, VideoOptions(fps=fps, min_pixels=SMALL), num_chunks, CostModel(min_chunk=0),
                      planning_family(""))
    assert plan.chunks is not None, "the index should be plannable"
    out = np.zeros(plan.out_shape, np.uint8)
    for c in plan.chunks:
        decode_chunk(data, c.spans, c.frame_pts, out[c.first:c.first + len(c.frame_indices)],
                     width=index.info.width, height=index.info.height, skip_nonref=skip_nonref)
    return plan, torch.from_numpy(out)


@pytest.mark.parametrize(("fps", "num_chunks"), [(2.0, 2), (9.0, 3), (30.0, 4)])
def test_chunks_match_sequential_decode(clip, fps, num_chunks):
    plan, frames = chunked(clip, fps, num_chunks)
    reference = decode_video(clip, fps=fps, min_pixels=SMALL)
    assert plan.indices == reference.indices
    assert plan.sample_fps == reference.sample_fps
    assert [i for c in plan.chunks for i in c.frame_indices] == reference.indices
    assert torch.equal(frames, torch.from_numpy(reference.frames))


def test_b_frames_and_open_gops_are_really_there():
    for name in ("h264 B-frames", "h264 open GOP"):
        index = index_video(make_video(seconds=2.0, fps=30, width=112, height=84, **CLIPS[name]),
                            max_frames=10_000, max_seconds=60)
        assert index.pts != sorted(index.pts), f"{name}: no frame reordering"
    # Open GOP: some frame decoded right after a later keyframe is shown before it.
    index = index_video(make_video(seconds=2.0, fps=30, width=112, height=84, **CLIPS["h264 open GOP"]),
                        max_frames=10_000, max_seconds=60)
    keys = [d for d, k in enumerate(index.is_key) if k and d > 0]
    assert any(index.pts[d + 1] < index.pts[d] for d in keys)


def test_skipping_nonref_frames_changes_nothing(clip):
    _, with_skip = chunked(clip, 30.0, 2, skip_nonref=True)
    _, without = chunked(clip, 30.0, 2, skip_nonref=False)
    assert torch.equal(with_skip, without)


def test_only_the_planned_packets_are_needed():
    data = make_video(seconds=4.0, fps=30, width=112, height=84, gop=30)
    index = index_video(data, max_frames=10_000, max_seconds=60)
    (chunk,) = plan_chunks(index.pts, index.is_key, [31, 33], 1)
    assert chunk.spans[0].start == 30  # the second GOP's keyframe; GOP 0 is never decoded
    out = np.zeros((2, 84, 112, 3), np.uint8)
    decode_chunk(data, chunk.spans, chunk.frame_pts, out, width=112, height=84)
    reference = decode_video(data, fps=30.0, min_pixels=SMALL, max_frames=1000)
    assert np.array_equal(out, reference.frames[[31, 33]])


def test_a_frame_outside_the_span_is_reported_missing():
    data = make_video(seconds=1.0, fps=30, width=64, height=48, gop=30)
    index = index_video(data, max_frames=10_000, max_seconds=60)
    out = np.zeros((1, 48, 64, 3), np.uint8)
    with pytest.raises(MediaError, match="1 of 1 sampled frames could not be decoded"):
        decode_chunk(data, (Span(0, 5, index.pts[0]),), (index.pts[20],), out, width=64, height=48)


def test_index_limits():
    data = make_video(seconds=2.0, fps=10, width=64, height=48)
    with pytest.raises(MediaError, match="over the limit of 1.5 s"):
        index_video(data, max_frames=10_000, max_seconds=1.5)
    with pytest.raises(MediaError, match="more than 10 frames"):
        index_video(data, max_frames=10, max_seconds=60)
    webm = make_video(seconds=2.0, fps=10, width=64, height=48, codec="vp9", container="webm")
    with pytest.raises(MediaError, match="more than 10 frames"):
        index_video(webm, max_frames=10, max_seconds=60)
