"""Load-test workloads: request builders, shapes, tagged media, synthetic workloads and traces."""

import collections
import hashlib
import io
import json
import random

import av
import numpy as np
import pytest
from PIL import Image

from loadtest import workloads
from mmserve.media.samples import make_image, make_video


def fake_make(kind, spec):
    return f"{kind}:{json.dumps(spec, sort_keys=True)}".encode()


@pytest.fixture(scope="module")
def bank():
    """Small real samples: tag_media needs MP4 and PNG bytes."""
    return {"video": [make_video(seconds=0.2, fps=10, width=64, height=48)], "image": [make_image()]}


def make_workload(shape, bank, **kwargs):
    kwargs.setdefault("max_tokens", 16)
    return workloads.SyntheticWorkload(workloads.parse_shape(shape), bank, rng=random.Random(0), run_id="t", **kwargs)


# --- requests and shapes ---------------------------------------------------------------------------------------

def test_build_request_puts_media_before_the_prompt_and_sets_token_counts():
    spec = workloads.RequestSpec("video", "What happens?", (workloads.MediaItem("video", b"clip"),
                                                            workloads.MediaItem("image", b"pic")),
                                 max_tokens=12, min_tokens=12)
    req = workloads.build_request(spec)
    (message,) = req.messages
    assert message.role == "user"
    assert [p.WhichOneof("content") for p in message.parts] == ["video", "image", "text"]
    assert message.parts[0].video.data == b"clip" and message.parts[1].image.data == b"pic"
    assert message.parts[2].text == "What happens?"
    assert (req.sampling.max_tokens, req.sampling.min_tokens) == (12, 12)


def test_build_request_leaves_min_tokens_unset_when_zero():
    req = workloads.build_request(workloads.RequestSpec("text", "hi", max_tokens=5))
    assert req.sampling.max_tokens == 5 and not req.sampling.HasField("min_tokens")
    assert [p.WhichOneof("content") for p in req.messages[0].parts] == ["text"]


def test_every_shape_has_weights_over_known_kinds_and_unknown_shapes_are_named():
    for shape, weights in workloads.SHAPES.items():
        assert set(weights) <= set(workloads.KINDS) and sum(weights.values()) == pytest.approx(1.0), shape
    with pytest.raises(ValueError, match="unknown shape 'video-only'.*mixed"):
        workloads.parse_shape("video-only")


def test_media_bank_generates_the_sample_sizes_of_the_media_kinds_only():
    bank = workloads.make_media_bank(["video", "text"], make=fake_make)
    assert list(bank) == ["video"]
    assert bank["video"] == [fake_make("video", s) for s in workloads.VIDEO_SAMPLES]


def test_tagged_mp4_decodes_to_the_same_frames_with_a_new_hash():
    clip = make_video(seconds=0.5, fps=10, width=64, height=48)
    tagged = workloads.tag_media(clip, "run 1")
    assert hashlib.sha256(tagged).digest() != hashlib.sha256(clip).digest()
    assert workloads.tag_media(clip, "run 2") != tagged

    def frames(data):
        with av.open(io.BytesIO(data)) as container:
            return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]

    a, b = frames(clip), frames(tagged)
    assert len(a) == len(b) == 5 and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_tagged_png_decodes_to_the_same_pixels():
    png = make_image(width=32, height=24)
    tagged = workloads.tag_media(png, "run 1")
    assert tagged != png
    with Image.open(io.BytesIO(png)) as x, Image.open(io.BytesIO(tagged)) as y:
        y.load()  # verifies the CRC of every chunk
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_tagging_refuses_formats_it_cannot_tag():
    with pytest.raises(ValueError, match="MP4/MOV and PNG"):
        workloads.tag_media(make_image(fmt="JPEG"), "x")


# --- synthetic workloads --------------------------------------------------------------------------------------

def test_text_only_draws_text_requests_without_media():
    w = make_workload("text-only", {})
    specs = [w.next() for _ in range(20)]
    assert {s.kind for s in specs} == {"text"} and all(not s.media for s in specs)
    assert all(s.max_tokens == s.min_tokens == 16 for s in specs)


def test_shape_weights_decide_the_class_mix(bank):
    w = make_workload("video-heavy", bank)
    counts = collections.Counter(w.next().kind for _ in range(2000))
    assert counts["video"] / 2000 == pytest.approx(0.7, abs=0.05)
    assert counts["image"] / 2000 == pytest.approx(0.2, abs=0.05)
    assert counts["text"] / 2000 == pytest.approx(0.1, abs=0.05)


def test_fresh_requests_are_unique_in_media_bytes_and_prompt(bank):
    w = make_workload("mixed", bank)
    specs = [w.next() for _ in range(30)]
    assert {s.kind for s in specs} == {"video", "image", "text"}
    assert len({s.prompt for s in specs}) == 30
    media = [s.media[0].data for s in specs if s.media]
    assert len(set(media)) == len(media)
    assert all(s.media[0].kind == s.kind for s in specs if s.media)


def test_cache_hit_ratio_one_repeats_the_first_request_of_each_class(bank):
    w = make_workload("mixed", bank, cache_hit_ratio=1.0)
    specs = [w.next() for _ in range(30)]
    assert w.num_unique == 3
    assert len({id(s) for s in specs}) == 3


def test_cache_hit_ratio_sets_the_share_of_repeats():
    w = make_workload("text-only", {}, cache_hit_ratio=0.25)
    for _ in range(2000):
        w.next()
    assert 1 - w.num_unique / 2000 == pytest.approx(0.25, abs=0.04)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"cache_hit_ratio": 1.5}, "cache_hit_ratio"),
])
def test_workload_checks_its_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_workload("text-only", {}, **kwargs)


def test_workload_needs_samples_of_each_media_class():
    with pytest.raises(ValueError, match="no video samples"):
        make_workload("mixed", {"image": [b"x"]})


# --- traces -----------------------------------------------------------------------------------------------------

TRACE = """\
# arrival offsets in seconds
{"at": 1.5, "kind": "image", "prompt": "What is it?", "media": {"width": 32, "height": 24}, "max_tokens": 8}
{"at": 0, "kind": "video", "prompt": "Describe.", "media": "clips/a.mp4", "max_tokens": 16, "min_tokens": 4}

{"at": 0.5, "kind": "text", "prompt": "Hello", "max_tokens": 4}
{"at": 2.0, "kind": "image", "prompt": "Again?", "media": [{"width": 32, "height": 24}, "clips/a.mp4"]}
"""


def test_parse_trace_sorts_by_offset_and_skips_comments_and_blank_lines():
    lines = workloads.parse_trace(TRACE.splitlines())
    assert [t.at for t in lines] == [0.0, 0.5, 1.5, 2.0]
    assert lines[0] == workloads.TraceLine(0.0, "video", "Describe.", ("clips/a.mp4",), 16, 4)
    assert lines[1].media == () and lines[3].max_tokens == 64


@pytest.mark.parametrize("line, match", [
    ('{"at": 0, "kind": "text"', "trace:1: not JSON"),
    ('[1, 2]', "trace:1: expected a JSON object"),
    ('{"at": -1, "kind": "text", "prompt": "x"}', r"trace:1\.at"),
    ('{"at": 0, "kind": "audio", "prompt": "x"}', r"trace:1\.kind"),
    ('{"at": 0, "kind": "video", "prompt": "x"}', r"trace:1\.media: a video request needs"),
    ('{"at": 0, "kind": "text", "prompt": "x", "media": "a.mp4"}', r"trace:1\.media: a text request"),
    ('{"at": 0, "kind": "image", "media": [3]}', r"trace:1\.media: expected"),
    ('{"at": 0, "kind": "text", "prompt": "x", "max_tokens": 0}', r"trace:1\.max_tokens"),
    ('{"at": 0, "kind": "text", "prompt": "x", "max_tokens": 4, "min_tokens": 5}', r"trace:1\.min_tokens"),
    ('{"at": 0, "kind": "text", "prompt": "x", "tokens": 5}', "unknown field 'tokens'"),
])
def test_parse_trace_names_the_line_and_field_of_a_bad_line(line, match):
    with pytest.raises(ValueError, match=match):
        workloads.parse_trace([line])


def test_parse_trace_refuses_an_empty_trace():
    with pytest.raises(ValueError, match="no requests"):
        workloads.parse_trace(["# nothing", ""])


def test_load_trace_reads_files_beside_the_trace_and_generates_each_spec_once(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.mp4").write_bytes(b"mp4 bytes")
    trace = tmp_path / "t.jsonl"
    trace.write_text(TRACE)
    made = []

    def make(kind, spec):
        made.append((kind, spec))
        return fake_make(kind, spec)

    specs = workloads.load_trace(trace, make=make)
    assert [s.kind for s in specs] == ["video", "text", "image", "image"]
    assert specs[0].media == (workloads.MediaItem("video", b"mp4 bytes"),)
    assert (specs[0].max_tokens, specs[0].min_tokens, specs[1].at) == (16, 4, 0.5)
    image = workloads.MediaItem("image", fake_make("image", {"width": 32, "height": 24}))
    assert specs[2].media == (image,)
    assert specs[3].media == (image, workloads.MediaItem("image", b"mp4 bytes"))
    assert made == [("image", {"width": 32, "height": 24})]


def test_load_trace_names_a_missing_file_or_a_bad_spec(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"at": 0, "kind": "video", "prompt": "x", "media": "missing.mp4"}\n')
    with pytest.raises(ValueError, match="missing.mp4"):
        workloads.load_trace(trace)
    trace.write_text('{"at": 0, "kind": "image", "prompt": "x", "media": {"colour": "red"}}\n')
    with pytest.raises(ValueError, match="colour"):
        workloads.load_trace(trace)
