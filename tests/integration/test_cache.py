"""The embedding cache: a repeated video with a new question skips decode and encode."""

from __future__ import annotations

from mmserve.media.samples import make_video
from tests.integration.helpers import collect, request, text, video
from tests.integration.reference import Reference


def test_same_video_new_question_is_a_cache_hit(router, tiny_model):
    clip = make_video(seconds=2.0, fps=30, width=140, height=84, seed=21)
    first = collect(router, request(video(clip), text("What colour dominates?"), num_tokens=32))
    assert not first.final.media_cached and first.final.num_media_cached == 0
    assert first.final.timings.decode_ms > 0 and first.final.timings.encode_ms > 0

    second_request = request(video(clip), text("How many objects move?"), num_tokens=32)
    second = collect(router, second_request)
    assert second.final.media_cached and second.final.num_media_cached == 1
    assert second.final.timings.decode_ms == 0 and second.final.timings.encode_ms == 0
    assert second.token_ids == Reference(tiny_model).generate(second_request, 32)


def test_other_sampling_options_miss(router):
    clip = make_video(seconds=2.0, fps=30, width=140, height=84, seed=22)
    collect(router, request(video(clip), text("Describe."), num_tokens=4))
    other = collect(router, request(video(clip, fps=1.0), text("Describe."), num_tokens=4))
    assert not other.final.media_cached, "a different fps must not reuse the embeddings"
