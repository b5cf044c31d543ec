"""Load-test results: the metrics of a stream and the report (summary table, durations, history series, plot)."""

import numpy as np
import pytest

from loadtest import metrics, report
from mmserve.v1 import api_pb2


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
