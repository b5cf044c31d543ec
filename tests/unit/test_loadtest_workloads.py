"""Load-test building blocks: request builders, shapes, traces, arrival pacing, stream metrics and the report."""

import collections
import hashlib
import io
import json
import random

import av
import numpy as np
import pytest
from PIL import Image

from loadtest import metrics, report, workloads
from loadtest.pacing import ArrivalClock, SyntheticPacer, TraceSchedule
from mmserve.media.samples import make_image, make_video
from mmserve.v1 import api_pb2

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


# --- pacing -----------------------------------------------------------------------------------------------------

def arrivals(clock, now=0.0, n=5):
    """Arrival times of a user that sends instantly at each arrival."""
    times = []
    for _ in range(n):
        now += clock.wait(now)
        times.append(now)
    return times


def test_constant_arrivals_are_evenly_spaced_and_staggered_across_users():
    users = [ArrivalClock(2.0, 4, arrivals="constant", index=i) for i in range(4)]
    merged = sorted(t for clock in users for t in arrivals(clock))
    assert merged == pytest.approx([i * 0.5 for i in range(20)])


def test_poisson_arrivals_have_the_users_share_of_the_rate():
    clock = ArrivalClock(2.0, 4, arrivals="poisson", rng=random.Random(1))
    times = arrivals(clock, n=4000)
    gaps = np.diff([0.0, *times])
    assert gaps.mean() == pytest.approx(2.0, rel=0.05)  # 4 users / 2 req/s
    assert gaps.std() == pytest.approx(2.0, rel=0.1)  # exponential: std = mean


def test_a_late_user_sends_at_once_and_keeps_its_timeline():
    clock = ArrivalClock(1.0, 1, arrivals="constant")
    assert clock.wait(0.0) == 0.0
    # Busy until 3.5: the arrivals at 1, 2 and 3 go at once, the one at 4 keeps its time.
    assert [clock.wait(3.5) for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(0.5)]


def test_arrival_clock_checks_its_settings():
    for kwargs in ({"rate": 0, "num_users": 1}, {"rate": 1, "num_users": 0}):
        with pytest.raises(ValueError):
            ArrivalClock(**kwargs)
    with pytest.raises(ValueError, match="poisson or constant"):
        ArrivalClock(1.0, 1, arrivals="burst")


def test_synthetic_pacer_pairs_the_users_clock_with_the_shared_workload():
    w = make_workload("text-only", {})
    pacer = SyntheticPacer(w, ArrivalClock(1.0, 2, arrivals="constant", index=1, start=10.0))
    delay, spec = pacer.next(10.0)
    assert delay == pytest.approx(1.0) and spec.kind == "text"


def test_trace_schedule_sends_lines_at_their_offsets_and_repeats_after_span_plus_mean_gap():
    specs = [workloads.RequestSpec("text", str(at), at=at) for at in (3.0, 1.0, 2.0)]
    schedule = TraceSchedule(specs, start=100.0)
    assert schedule.period == pytest.approx(3.0)  # span 2 s + mean gap 1 s
    due = []
    for _ in range(6):
        delay, spec = schedule.next(100.0)
        due.append((delay, spec.prompt))
    assert due == [(1.0, "1.0"), (2.0, "2.0"), (3.0, "3.0"), (4.0, "1.0"), (5.0, "2.0"), (6.0, "3.0")]
    assert schedule.next(200.0)[0] == 0.0  # a line already due goes at once


def test_trace_schedule_of_one_line_repeats_every_second():
    schedule = TraceSchedule([workloads.RequestSpec("text", "x", at=0.5)])
    assert [schedule.next(0.0)[0] for _ in range(3)] == [0.5, 1.5, 2.5]


# --- metrics ----------------------------------------------------------------------------------------------------

def delta(*ids):
    return api_pb2.GenerateResponse(delta=api_pb2.Delta(text="x", token_ids=list(ids)))


def final(tokens, num_media=0, num_cached=0):
    timings = api_pb2.Timings(queue_ms=1, decode_ms=20, encode_ms=30, prefill_ms=40, ttft_ms=95, total_ms=300,
                              tpot_ms=10)
    return api_pb2.GenerateResponse(final=api_pb2.Final(completion_tokens=tokens, timings=timings,
                                                        num_media=num_media, num_media_cached=num_cached))


def stream(replies, times, start=10.0, end=None):
    t = metrics.StreamTimes(start=start)
    for reply, now in zip(replies, times):
        t.on_reply(reply, now)
    t.end = end if end is not None else times[-1]
    return t


def by_name(samples):
    return {(s.request_type, s.name): s for s in samples}


def test_a_completed_stream_gives_ttft_tpot_e2e_and_router_stages():
    t = stream([delta(1), delta(2, 3), delta(4), final(4, num_media=1)], [10.1, 10.13, 10.16, 10.16])
    s = by_name(metrics.completed_samples("video", t))
    assert s["grpc", "ttft video"].response_time == pytest.approx(100)
    assert s["grpc", "tpot video"].response_time == pytest.approx(20)  # 60 ms over 3 tokens after the first
    assert s["grpc", "e2e video"].response_time == pytest.approx(160)
    assert s["grpc", "e2e video"].response_length == 4
    router = {name: x.response_time for (kind, name), x in s.items() if kind == "router"}
    # Every Timings field but the client's own three (the proto may add stages).
    assert router.items() >= {"queue video": 1, "decode video": 20, "encode video": 30, "prefill video": 40}.items()
    assert len(router) == len(api_pb2.Timings.DESCRIPTOR.fields) - 3
    assert not {"ttft video", "tpot video", "total video"} & set(router)
    assert all(x.error is None for x in s.values())


def test_cached_media_and_text_requests_have_no_media_stages():
    t = stream([delta(1), final(1, num_media=2, num_cached=2)], [10.05, 10.05])
    s = by_name(metrics.completed_samples("image", t))
    assert set(s) == {("grpc", "ttft image"), ("grpc", "e2e image"), ("router", "queue image"),
                      ("router", "prefill image")}  # one token: no TPOT


def test_a_failed_stream_fails_its_e2e_entry_without_a_response_time():
    t = stream([delta(1)], [10.2], end=10.5)
    s = by_name(metrics.failed_samples("text", t, "RESOURCE_EXHAUSTED"))
    assert s["grpc", "ttft text"].response_time == pytest.approx(200) and s["grpc", "ttft text"].error is None
    e2e = s["grpc", "e2e text"]
    assert (e2e.response_time, e2e.response_length, e2e.error) == (None, 1, "RESOURCE_EXHAUSTED")
    assert set(s) == {("grpc", "ttft text"), ("grpc", "e2e text")}


def test_a_stream_without_final_is_a_failure():
    t = stream([delta(1)], [10.2])
    (e2e,) = [x for x in metrics.completed_samples("text", t) if x.name == "e2e text"]
    assert e2e.error == metrics.NO_FINAL


# --- report -----------------------------------------------------------------------------------------------------

STATS = """\
Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,\
Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%
grpc,e2e image,4,4,0,0,0,0,0.0,0.2,0.2,0,0,0,0,0,0,0,0,0,0,0
grpc,e2e text,10,2,400,420,300,900,8.0,0.5,0.1,400,410,420,430,800,850,900,900,900,900,900
router,prefill text,8,0,100,100,90,110,0,0.4,0,100,100,100,100,110,110,110,110,110,110,110
grpc,tpot text,8,0,9,9,8,12,0,0.4,0,9,9,10,10,11,12,12,12,12,12,12
grpc,ttft text,8,0,150,150,120,300,0,0.4,0,150,160,170,180,250,280,300,300,300,300,300
,Aggregated,38,6,100,100,0,900,2.1,1.9,0.3,100,100,100,100,100,100,100,100,100,100,100
"""
FAILURES = """\
Method,Name,Error,Occurrences,First Seen,Last Seen
grpc,e2e image,RESOURCE_EXHAUSTED,4,x,y
grpc,e2e text,DEADLINE_EXCEEDED,1,x,y
grpc,e2e text,RESOURCE_EXHAUSTED,1,x,y
"""


def test_summary_counts_requests_failures_by_kind_and_reads_percentiles():
    s = report.summarize(STATS, FAILURES, duration_s=20)
    assert (s.num_requests, s.num_failures, s.num_ok) == (14, 6, 8)
    assert s.failures == {"RESOURCE_EXHAUSTED": 5, "DEADLINE_EXCEEDED": 1}
    text = s.classes["text"]
    assert text.percentiles == {"e2e": (400, 800, 900), "tpot": (9, 11, 12), "ttft": (150, 250, 300)}
    assert text.router_p50 == {"prefill": 100} and text.num_tokens == 80
    assert all(np.isnan(v) for v in s.classes["image"].percentiles["e2e"])  # every request failed
    table = s.format()
    assert "requests 14  ok 8  failed 6 (RESOURCE_EXHAUSTED 5, DEADLINE_EXCEEDED 1)" in table
    assert "achieved 0.70 req/s (0.40 ok), 4.0 completion tokens/s" in table
    assert "150/250/300" in table and "9/11/12" in table and "-/-/-" in table


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("2m", 120), ("1h30m", 5400), ("1m5s", 65)])
def test_parse_duration(text, seconds):
    assert report.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "1.5s", "10x", "m1"])
def test_parse_duration_refuses_other_spellings(text):
    with pytest.raises(ValueError):
        report.parse_duration(text)


def history(rows):
    header = ("Timestamp,User Count,Type,Name,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,"
              "99.99%,100%,Total Request Count,Total Failure Count,Total Median Response Time,"
              "Total Average Response Time,Total Min Response Time,Total Max Response Time,Total Average Content Size")
    lines = [header]
    for ts, name, p50, count, failures, tokens in rows:
        p = "N/A" if p50 is None else p50
        lines.append(f"{ts},4,grpc,{name},0,0,{p},{p},{p},{p},{p},{p},{p},{p},{p},{p},{p},{count},{failures},"
                     f"0,0,0,0,{tokens}")
    lines.append(f"{rows[-1][0]},4,,Aggregated,0,0,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,0,0,0,0,0,0,0")
    return "\n".join(lines) + "\n"


def test_history_series_gives_windowed_rates_and_blanks_empty_percentile_windows():
    csv_text = history([(100 + i, "e2e text", None if i < 2 else 500, 2 * i, i // 5, 8.0) for i in range(12)]
                       + [(105 + i, "e2e video", 900, i, 0, 4.0) for i in range(7)])
    s = report.history_series(csv_text, window_s=5)
    text = s["e2e text"]
    assert text["t"] == list(range(12))
    assert np.isnan(text["50%"][0]) and text["50%"][5] == 500
    assert text["finished/s"][5:] == [2.0] * 7  # 2 more requests every second
    assert text["finished/s"][0] == 0.0 and text["finished/s"][2] == pytest.approx(4 / 5)
    times, rate = report.tokens_rate([text, s["e2e video"]], window_s=5)
    assert times == list(range(12))
    assert rate[4] == pytest.approx(8 * 8 / 5)  # text only: 8 requests × 8 tokens in 5 s
    assert rate[11] == pytest.approx((10 * 8 + 5 * 4) / 5)  # 10 text and 5 video requests more


def test_plot_writes_a_png(tmp_path):
    csv_text = history([(100 + i, f"{m} text", 100 + i, i, 0, 8.0) for i in range(5) for m in ("ttft", "e2e")])
    path = tmp_path / "load.png"
    report.plot(csv_text, path, title="test")
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
