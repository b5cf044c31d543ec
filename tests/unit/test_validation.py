"""Router request validation: every rule rejects with a message naming the field, valid requests pass."""

from __future__ import annotations

import math

import pytest

from mmserve import request_ids
from mmserve.v1 import api_pb2
from services.router.validation import RequestLimits, ValidationError, validate_request

LIMITS = {"max_messages": 4, "max_media": 3, "max_tokens_limit": 1024, "max_media_bytes": 1000}


def text(s: str = "hello") -> api_pb2.Part:
    return api_pb2.Part(text=s)


def image(**media) -> api_pb2.Part:
    media.setdefault("data", b"\x89PNG-bytes")
    return api_pb2.Part(image=api_pb2.Media(**media))


def video(**media) -> api_pb2.Part:
    media.setdefault("uri", "file:///clip.mp4")
    return api_pb2.Part(video=api_pb2.Media(**media))


def message(*parts: api_pb2.Part, role: str = "user") -> api_pb2.Message:
    return api_pb2.Message(role=role, parts=list(parts))


def request(*messages: api_pb2.Message, **sampling) -> api_pb2.GenerateRequest:
    if not messages:
        messages = (message(text()),)
    return api_pb2.GenerateRequest(messages=list(messages), sampling=api_pb2.SamplingParams(**sampling))


def rejects(req: api_pb2.GenerateRequest, field: str, limits: RequestLimits | None = None) -> None:
    with pytest.raises(ValidationError) as info:
        validate_request(req, limits or RequestLimits(**LIMITS))
    assert field in str(info.value), str(info.value)


def test_valid_request_with_text_image_and_video_passes():
    req = request(
        message(text("be brief"), role="system"),
        message(text("what is shown?"), image(), video(fps=2.0, max_frames=16, min_pixels=3136, max_pixels=50176)),
        message(text("a cat"), role="assistant"),
        message(text("and now?"), image(uri="file:///a.png")),
        max_tokens=1024, temperature=0.7, top_p=0.9, top_k=20, seed=1, stop=["\n\n"], min_tokens=2,
    )
    validate_request(req, RequestLimits(**LIMITS))


def test_validation_error_is_a_value_error():
    assert issubclass(ValidationError, ValueError)


def test_empty_messages():
    rejects(api_pb2.GenerateRequest(), "messages: empty")


def test_too_many_messages():
    rejects(request(*[message(text())] * 5), "messages: 5 exceed")


@pytest.mark.parametrize("role", ["", "User", "tool", "bot"])
def test_unknown_role(role):
    rejects(request(message(text()), message(text(), role=role)), "messages[1].role")


def test_empty_parts():
    rejects(request(message(text()), message()), "messages[1].parts: empty")


def test_part_without_content():
    rejects(request(message(text(), api_pb2.Part())), "messages[0].parts[1]: no text, image or video")


@pytest.mark.parametrize("role", ["system", "assistant"])
@pytest.mark.parametrize("make, kind", [(image, "image"), (video, "video")])
def test_media_outside_user_messages(role, make, kind):
    rejects(request(message(text()), message(text(), make(), role=role)), f"messages[1].parts[1].{kind}")


def test_media_without_source():
    rejects(request(message(api_pb2.Part(image=api_pb2.Media()))), "messages[0].parts[0].image: neither data nor uri")


def test_empty_data():
    rejects(request(message(image(data=b""))), "messages[0].parts[0].image.data: empty")


def test_empty_uri():
    rejects(request(message(video(uri=""))), "messages[0].parts[0].video.uri: empty")


def test_data_at_the_byte_limit_passes_and_one_more_byte_fails():
    validate_request(request(message(image(data=b"x" * 1000))), RequestLimits(**LIMITS))
    rejects(request(message(image(data=b"x" * 1001))), "messages[0].parts[0].image.data: 1001 bytes")


@pytest.mark.parametrize("fps", [0.0, -1.0, 60.5, math.nan, math.inf])
def test_fps_out_of_range(fps):
    rejects(request(message(video(fps=fps))), "messages[0].parts[0].video.fps")


@pytest.mark.parametrize("fps", [0.1, 60.0])
def test_fps_in_range(fps):
    validate_request(request(message(video(fps=fps))), RequestLimits(**LIMITS))


@pytest.mark.parametrize("max_frames", [0, 1, 769])
def test_max_frames_out_of_range(max_frames):
    rejects(request(message(video(max_frames=max_frames))), "messages[0].parts[0].video.max_frames")


def test_min_pixels_above_max_pixels():
    rejects(request(message(image(min_pixels=5000, max_pixels=4000))), "messages[0].parts[0].image: min_pixels")


def test_max_pixels_below_one_patch():
    rejects(request(message(image(max_pixels=28 * 28 - 1))), "messages[0].parts[0].image.max_pixels")


def test_too_many_media_items_across_messages():
    validate_request(request(message(image(), image()), message(video())), RequestLimits(**LIMITS))
    rejects(request(message(image(), image()), message(video(), image())), "messages: 4 media items exceed")


def test_first_problem_is_named():
    rejects(request(message(text()), message(image(data=b"")), message(text(), role="bot")), "messages[1].parts[0]")


@pytest.mark.parametrize("max_tokens", [0, 1025])
def test_max_tokens_out_of_range(max_tokens):
    rejects(request(max_tokens=max_tokens), "sampling.max_tokens")


@pytest.mark.parametrize("temperature", [-0.1, math.nan, math.inf, -math.inf, 101.0])
def test_bad_temperature(temperature):
    rejects(request(temperature=temperature), "sampling.temperature")


def test_zero_temperature_means_greedy_and_passes():
    validate_request(request(temperature=0.0), RequestLimits(**LIMITS))


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.01, math.nan])
def test_bad_top_p(top_p):
    rejects(request(top_p=top_p), "sampling.top_p")


def test_empty_stop_string():
    rejects(request(stop=["END", ""]), "sampling.stop")


def test_min_tokens_above_max_tokens():
    rejects(request(max_tokens=10, min_tokens=11), "sampling.min_tokens")
    validate_request(request(max_tokens=10, min_tokens=10), RequestLimits(**LIMITS))


def test_min_tokens_above_default_max_tokens():
    rejects(request(min_tokens=257), "sampling.min_tokens")
    validate_request(request(min_tokens=256), RequestLimits(**LIMITS))


CAPPED = RequestLimits(**LIMITS, max_frames=64, min_pixels=3136, max_pixels=1_000_000,
                       max_slo_ttft_ms={"video": 8000, "image": 3000, "text": 1000}, max_slo_tpot_ms=200)


def test_request_ids_are_short_and_of_a_safe_alphabet():
    for good in ("abc-123", "req_1.2:3", "x" * 128):
        validate_request(api_pb2.GenerateRequest(request_id=good, messages=[message(text())]), CAPPED)
    for bad in ("x" * 129, "a\nINFO forged line", "a b", "é", "a\x00"):
        with pytest.raises(ValidationError, match="^request_id: at most 128"):
            validate_request(api_pb2.GenerateRequest(request_id=bad, messages=[message(text())]), CAPPED)


def test_a_log_line_never_shows_a_raw_request_id():
    assert request_ids.for_log("abc-1") == "abc-1"
    assert request_ids.for_log("") == "-"
    forged = request_ids.for_log("a\n2026-12-07 INFO forged" + "x" * 10_000)
    assert "\n" not in forged and " " not in forged and len(forged) <= 40 and forged.startswith("invalid:")


@pytest.mark.parametrize("field, value", [("min_pixels", 40_000_000), ("max_pixels", 40_000_000),
                                          ("min_pixels", 1000), ("max_pixels", 1_000_001)])
def test_pixel_bounds_may_narrow_the_models_never_widen_them(field, value):
    other = {"min_pixels": 3136} if field == "max_pixels" else {"max_pixels": max(value, 3136)}
    for kind in (image, video):
        where = "image" if kind is image else "video"
        with pytest.raises(ValidationError, match=rf"^messages\[0\].parts\[0\].{where}.{field}: {value} is outside "
                                                  r"the server's bounds \[3136, 1000000\]"):
            validate_request(request(message(kind(**{field: value, **other}))), CAPPED)
    validate_request(request(message(image(min_pixels=3136, max_pixels=1_000_000))), CAPPED)
    validate_request(request(message(video(min_pixels=50_000, max_pixels=60_000))), CAPPED)


def test_frames_per_video_are_capped_by_the_server():
    validate_request(request(message(video(max_frames=64))), CAPPED)
    rejects(request(message(video(max_frames=65))), "messages[0].parts[0].video.max_frames: 65 is not in [2, 64]",
            CAPPED)


@pytest.mark.parametrize("parts, cls, cap", [((text(),), "text", 1000), ((image(), text()), "image", 3000),
                                             ((image(), video()), "video", 8000)])
def test_an_slo_may_be_tighter_than_the_servers_not_looser(parts, cls, cap):
    req = request(message(*parts))
    req.slo.ttft_ms = cap
    req.slo.tpot_ms = 200
    validate_request(req, CAPPED)
    req.slo.ttft_ms = 4_000_000_000
    with pytest.raises(ValidationError, match=rf"^slo.ttft_ms: 4000000000 exceeds the limit of {cap} ms for {cls}"):
        validate_request(req, CAPPED)
    req.slo.ttft_ms = 0
    req.slo.tpot_ms = 201
    with pytest.raises(ValidationError, match="^slo.tpot_ms: 201 exceeds the limit of 200 ms"):
        validate_request(req, CAPPED)


def test_top_logprobs_up_to_the_server_cap_pass_and_one_more_fails():
    validate_request(request(logprobs=True, top_logprobs=20), RequestLimits(**LIMITS))
    rejects(request(logprobs=True, top_logprobs=21), "sampling.top_logprobs: 21 is not in [0, 20]")
    rejects(request(logprobs=True, top_logprobs=6), "sampling.top_logprobs", RequestLimits(**LIMITS, max_top_logprobs=5))


def test_top_logprobs_without_logprobs():
    rejects(request(top_logprobs=3), "sampling.top_logprobs: needs sampling.logprobs")
    validate_request(request(logprobs=True), RequestLimits(**LIMITS))
