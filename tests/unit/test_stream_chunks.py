"""Streamed prefill's chunks in plain Python: fixed windows from the plan, their cache keys, partial hits."""

from __future__ import annotations

from mmserve.cache import CachedEmbedding
from mmserve.cache_keys import MediaParams, media_key, window_key
from mmserve.models.family import DecodePlan, MediaItem
from mmserve.models.qwen2_5_vl import from_defaults
from mmserve.v1 import tensor_pb2
from services.router.costs import MediaShape
from services.router.planning import Chunks, cached_chunks, missing_shape, plan_chunks

FAMILY = from_defaults()  # temporal groups of 2 frames, 4 patches per row


def video_plan(num_frames: int, grid_h: int = 8, grid_w: int = 12) -> DecodePlan:
    return DecodePlan(num_frames, grid_h * 14, grid_w * 14, MediaItem("video", (num_frames // 2, grid_h, grid_w)),
                      tuple(range(num_frames)))


def test_windows_are_fixed_whole_groups_and_the_last_takes_the_rest():
    chunks = plan_chunks(video_plan(20), FAMILY, 8)  # 10 groups of 24 rows, 4 groups a window
    assert chunks == Chunks(8, (96, 96, 48), 20)
    assert [chunks.frames_of(i) for i in range(3)] == [(0, 8), (8, 8), (16, 4)]
    assert plan_chunks(video_plan(20), FAMILY, 7).chunk_frames % 2 == 0  # rounded to the temporal group
    assert plan_chunks(video_plan(20), FAMILY, 1).chunk_frames == 2  # at least one group
    assert plan_chunks(video_plan(4), FAMILY, 64) == Chunks(64, (48,), 4)  # a short clip is one window
    assert plan_chunks(video_plan(2), FAMILY, 64) == Chunks(64, (24,), 2)


def test_an_image_is_one_chunk():
    plan = DecodePlan(1, 112, 168, MediaItem("image", (1, 8, 12)))
    assert plan_chunks(plan, FAMILY, 8) == Chunks(0, (24,), 1)


def test_chunk_keys_come_from_the_media_and_the_window_never_from_a_decode():
    item = media_key("sha", "model:qwen2_5_vl:float32", MediaParams("video", fps=2.0, max_frames=64))
    # Two requests for the same bytes plan the same windows, whatever their decoders' workers: the same keys.
    a = [window_key(item, plan_chunks(video_plan(20), FAMILY, 8).chunk_frames, i) for i in range(3)]
    b = [window_key(item, plan_chunks(video_plan(20), FAMILY, 8).chunk_frames, i) for i in range(3)]
    assert a == b and len(set(a)) == 3
    assert window_key(item, 4, 0) != window_key(item, 8, 0)  # another window is another entry
    # Store-and-forward's chunk keys name only the index a decode happened to cut: never the same entries.
    assert not set(a) & {media_key("sha", "model:qwen2_5_vl:float32", MediaParams("video", fps=2.0, max_frames=64), i)
                         for i in range(3)}


def entry(chunk_index: int, num_chunks: int, first_frame: int, rows: int, dtype: str = "float32") -> CachedEmbedding:
    return CachedEmbedding(tensor_pb2.TensorRef(dtype=dtype, shape=[rows, 64]), (rows // 24 * 1, 8, 12), 1.0,
                           chunk_index, num_chunks, first_frame, 8)


def test_a_partly_cached_video_decodes_only_the_missing_windows():
    chunks = plan_chunks(video_plan(20), FAMILY, 8)
    entries = [entry(0, 3, 0, 96), None, entry(2, 3, 16, 48)]  # the middle window was evicted
    assert cached_chunks(entries, chunks, "float32") == (0, 2)
    assert cached_chunks(entries, chunks, "bfloat16") == ()  # another encoder dtype's entries are misses
    # Entries that do not fit the plan (another window size, another chunk count) are misses too.
    assert cached_chunks([entry(0, 5, 0, 96), entry(1, 3, 4, 96), entry(2, 3, 16, 48)], chunks, "float32") == (2,)
    planned = MediaShape(20, 20 * 1000, 240 * 4)
    assert missing_shape(planned, chunks, (1,)) == MediaShape(8, 8 * 1000, 96 * 4)
    assert missing_shape(planned, chunks, ()) is None
