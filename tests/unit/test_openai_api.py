"""OpenAI JSON → GenerateRequest, replies → OpenAI objects, gRPC status → HTTP error: no server needed."""

from __future__ import annotations

import base64
import json

import grpc
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from stack.cli import build_parser
from stack.launcher import StackSpec, plan
from mmserve.v1 import api_pb2
from services.router.config import RouterConfig
from services.router.openai_logprobs import logprobs_json
from services.router.openai_protocol import (ApiError, chunk_json, completion_json, error_from_grpc,
                                             loopback_address, parse_chat_body, parse_chat_request,
                                             served_model_name, sse)
from services.router.validation import RequestLimits, validate_request

MODEL = "tiny"
PNG = b"\x89PNG\r\n\x1a\n fake png bytes"
MP4 = b"\x00\x00\x00\x18ftypmp42 fake mp4 bytes"


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def parse(body: dict, **overrides):
    return parse_chat_request({"model": MODEL, **body, **overrides}, model_name=MODEL, request_id="r1")


def user(*parts) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}]}


def refused(body: dict) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_chat_request(body, model_name=MODEL, request_id="r1")
    return info.value


def test_string_content_becomes_one_text_part_per_message():
    chat = parse({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello."}, {"role": "developer", "content": "x"}]})
    req = chat.grpc_request
    assert req.request_id == "r1"
    assert [m.role for m in req.messages] == ["system", "user", "assistant", "system"]
    assert [[p.text for p in m.parts] for m in req.messages] == [["Be brief."], ["Hi"], ["Hello."], ["x"]]
    assert not chat.stream and not chat.include_usage


def test_parts_keep_their_order_and_media_sources():
    req = parse(user({"type": "text", "text": "Compare"},
                     {"type": "image_url", "image_url": {"url": data_url("image/png", PNG), "detail": "high"}},
                     {"type": "image_url", "image_url": "https://example.com/a.jpg"},
                     {"type": "video_url", "video_url": {"url": "file:///media/clip.mp4"}},
                     {"type": "video_url", "video_url": {"url": data_url("video/mp4", MP4)}})).grpc_request
    parts = req.messages[0].parts
    assert [p.WhichOneof("content") for p in parts] == ["text", "image", "image", "video", "video"]
    assert parts[1].image.data == PNG
    assert parts[2].image.uri == "https://example.com/a.jpg"
    assert parts[3].video.uri == "file:///media/clip.mp4"
    assert parts[4].video.data == MP4
    assert not parts[4].video.HasField("fps")
    validate_request(req, RequestLimits(max_messages=8, max_media=8, max_tokens_limit=8192, max_media_bytes=1 << 20))


def test_video_options_apply_to_every_video_and_a_part_may_override_them():
    body = user({"type": "video_url", "video_url": {"url": "https://e.com/a.mp4"}},
                {"type": "video_url", "video_url": {"url": "https://e.com/b.mp4", "fps": 1, "max_frames": 8}},
                {"type": "image_url", "image_url": {"url": "https://e.com/c.png"}})
    parts = parse(body, fps=0.5, max_frames=16).grpc_request.messages[0].parts
    assert (parts[0].video.fps, parts[0].video.max_frames) == (0.5, 16)
    assert (parts[1].video.fps, parts[1].video.max_frames) == (1.0, 8)
    assert not parts[2].image.HasField("fps") and not parts[2].image.HasField("max_frames")


def test_sampling_fields_map_and_unset_ones_stay_unset():
    s = parse(user({"type": "text", "text": "hi"}), max_tokens=12, temperature=0, top_p=0.9, seed=7, stop="END",
              top_k=40, min_tokens=3).grpc_request.sampling
    assert (s.max_tokens, s.temperature, s.seed, s.top_k, s.min_tokens, list(s.stop)) == (12, 0.0, 7, 40, 3, ["END"])
    assert s.top_p == pytest.approx(0.9)
    assert s.HasField("temperature")  # zero (greedy) is set, not defaulted
    empty = parse(user({"type": "text", "text": "hi"})).grpc_request.sampling
    assert not any(empty.HasField(name) for name in ("max_tokens", "temperature", "top_p", "seed", "top_k"))
    assert list(parse(user({"type": "text", "text": "hi"}), stop=["a", "b"]).grpc_request.sampling.stop) == ["a", "b"]


def test_max_completion_tokens_wins_and_top_k_minus_one_is_off():
    s = parse(user({"type": "text", "text": "hi"}), max_tokens=5, max_completion_tokens=9, top_k=-1,
              temperature=None).grpc_request.sampling
    assert s.max_tokens == 9
    assert not s.HasField("top_k") and not s.HasField("temperature")


def test_slo_extras_map_to_the_request_slo_and_absent_ones_leave_it_unset():
    req = parse(user({"type": "text", "text": "hi"}), ttft_ms=1500, tpot_ms=80, allow_degrade=True).grpc_request
    assert req.HasField("slo")
    assert (req.slo.ttft_ms, req.slo.tpot_ms, req.slo.allow_degrade) == (1500, 80, True)
    only_degrade = parse(user({"type": "text", "text": "hi"}), allow_degrade=True).grpc_request.slo
    assert (only_degrade.ttft_ms, only_degrade.tpot_ms, only_degrade.allow_degrade) == (0, 0, True)  # 0: default
    assert not parse(user({"type": "text", "text": "hi"})).grpc_request.HasField("slo")


def test_stream_flags_and_harmless_fields():
    chat = parse(user({"type": "text", "text": "hi"}), stream=True, stream_options={"include_usage": True}, n=1,
                 user="u-1", logprobs=False, response_format={"type": "text"}, presence_penalty=0, tools=[],
                 metadata={"k": "v"})
    assert chat.stream and chat.include_usage
    assert parse({"messages": [{"role": "user", "content": "hi"}]}, model=None).grpc_request.messages


GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
BAD = {
    "n=2": ({**GOOD, "n": 2}, "n"),
    "tools": ({**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    "logprobs a string": ({**GOOD, "logprobs": "yes"}, "logprobs"),
    "top_logprobs without logprobs": ({**GOOD, "top_logprobs": 2}, "top_logprobs"),
    "top_logprobs over the cap": ({**GOOD, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "top_logprobs negative": ({**GOOD, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    "top_logprobs a float": ({**GOOD, "logprobs": True, "top_logprobs": 2.0}, "top_logprobs"),
    "json mode": ({**GOOD, "response_format": {"type": "json_object"}}, "response_format"),
    "penalty": ({**GOOD, "frequency_penalty": 0.5}, "frequency_penalty"),
    "unknown field": ({**GOOD, "best_of": 3}, "best_of"),
    "body not an object": ([GOOD], "body"),
    "no messages": ({"model": MODEL}, "messages"),
    "empty messages": ({**GOOD, "messages": []}, "messages"),
    "message not an object": ({**GOOD, "messages": ["hi"]}, "messages[0]"),
    "tool role": ({**GOOD, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    "null content": ({**GOOD, "messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    "empty part list": ({**GOOD, "messages": [{"role": "user", "content": []}]}, "messages[0].content"),
    "tool calls": ({**GOOD, "messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]},
                   "messages[0].tool_calls"),
    "unknown part type": ({**GOOD, **user({"type": "input_audio", "input_audio": {}})}, "messages[0].content[0].type"),
    "text not a string": ({**GOOD, **user({"type": "text", "text": 3})}, "messages[0].content[0].text"),
    "no url": ({**GOOD, **user({"type": "image_url", "image_url": {}})}, "messages[0].content[0].image_url.url"),
    "bad base64": ({**GOOD, **user({"type": "text", "text": "x"},
                                   {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@notb64"}})},
                   "messages[0].content[1].image_url.url"),
    "data url not base64": ({**GOOD, **user({"type": "image_url", "image_url": {"url": "data:image/png,abc"}})},
                            "messages[0].content[0].image_url.url"),
    "empty data": ({**GOOD, **user({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,"}})},
                   "messages[0].content[0].video_url.url"),
    "ftp url": ({**GOOD, **user({"type": "video_url", "video_url": {"url": "ftp://e.com/a.mp4"}})},
                "messages[0].content[0].video_url.url"),
    "part fps a string": ({**GOOD, **user({"type": "video_url", "video_url": {"url": "https://e/a", "fps": "2"}})},
                          "messages[0].content[0].video_url.fps"),
    "max_tokens a string": ({**GOOD, "max_tokens": "10"}, "max_tokens"),
    "max_tokens zero": ({**GOOD, "max_tokens": 0}, "max_tokens"),
    "max_tokens float": ({**GOOD, "max_completion_tokens": 10.0}, "max_completion_tokens"),
    "max_tokens beyond uint32": ({**GOOD, "max_tokens": 2**40}, "max_tokens"),
    "temperature a bool": ({**GOOD, "temperature": True}, "temperature"),
    "top_p a string": ({**GOOD, "top_p": "0.5"}, "top_p"),
    "negative seed": ({**GOOD, "seed": -1}, "seed"),
    "stop with a number": ({**GOOD, "stop": ["a", 1]}, "stop"),
    "top_k below -1": ({**GOOD, "top_k": -2}, "top_k"),
    "fps a string": ({**GOOD, "fps": "2"}, "fps"),
    "ttft_ms negative": ({**GOOD, "ttft_ms": -1}, "ttft_ms"),
    "ttft_ms a float": ({**GOOD, "ttft_ms": 1.5}, "ttft_ms"),
    "tpot_ms a string": ({**GOOD, "tpot_ms": "50"}, "tpot_ms"),
    "tpot_ms beyond uint32": ({**GOOD, "tpot_ms": 2**32}, "tpot_ms"),
    "allow_degrade a string": ({**GOOD, "allow_degrade": "yes"}, "allow_degrade"),
    "allow_degrade a number": ({**GOOD, "allow_degrade": 1}, "allow_degrade"),
    "stream a string": ({**GOOD, "stream": "yes"}, "stream"),
    "stream_options a list": ({**GOOD, "stream_options": []}, "stream_options"),
    "include_usage a string": ({**GOOD, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_are_400_naming_the_field(case):
    body, param = BAD[case]
    err = refused(body)
    assert err.status == 400 and err.param == param
    assert err.message.startswith(f"{param}: ")
    assert err.body()["error"] == {"message": err.message, "type": "invalid_request_error", "param": param,
                                   "code": "invalid_argument"}


def test_another_model_name_is_404():
    err = refused({**GOOD, "model": "gpt-4o"})
    assert err.status == 404 and err.code == "model_not_found" and "gpt-4o" in err.message


def test_body_that_is_not_json_is_400():
    with pytest.raises(ApiError) as info:
        parse_chat_body(b"{not json", model_name=MODEL, request_id="r1")
    assert info.value.status == 400 and info.value.param == "body"
    with pytest.raises(ApiError):
        parse_chat_body(b"\xff\xfe\x00garbage", model_name=MODEL, request_id="r1")
    assert parse_chat_body(json.dumps(GOOD).encode(), model_name=MODEL, request_id="r1").grpc_request.messages


@pytest.mark.parametrize("code, status, kind", [
    (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
    (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable_error"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error"),
    (grpc.StatusCode.INTERNAL, 500, "internal_error"),
    (grpc.StatusCode.UNKNOWN, 500, "internal_error"),
    (grpc.StatusCode.CANCELLED, 500, "internal_error"),
])
def test_grpc_status_maps_to_http(code, status, kind):
    err = error_from_grpc(code, "video: truncated at 3.2 s", ())
    assert (err.status, err.type, err.code) == (status, kind, code.name.lower())
    assert err.body()["error"]["message"] == "video: truncated at 3.2 s"
    assert err.headers == {}


def test_retry_after_ms_becomes_retry_after_seconds():
    err = error_from_grpc(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", (("other", "x"), ("retry-after-ms", "1500")))
    assert err.headers == {"Retry-After": "2", "retry-after-ms": "1500"}
    assert error_from_grpc(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", [("retry-after-ms", "0")]).headers[
        "Retry-After"] == "0"
    assert error_from_grpc(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", [("retry-after-ms", "soon")]).headers == {}
    assert error_from_grpc(grpc.StatusCode.RESOURCE_EXHAUSTED, "", None).message == "RESOURCE_EXHAUSTED"
    # Only an overload refusal carries a retry hint.
    assert error_from_grpc(grpc.StatusCode.UNAVAILABLE, "gone", [("retry-after-ms", "100")]).headers == {}


def final(**kw) -> api_pb2.Final:
    return api_pb2.Final(finish_reason="length", prompt_tokens=20, completion_tokens=4, request_id="r1",
                         num_media=1, num_media_cached=1, media_cached=True,
                         timings=api_pb2.Timings(ttft_ms=12.5, total_ms=40.0), **kw)


def test_completion_object_is_what_the_openai_client_parses():
    body = json.loads(json.dumps(completion_json("chatcmpl-r1", MODEL, 1700000000, "Hello there", final())))
    parsed = ChatCompletion.model_validate(body)
    assert parsed.id == "chatcmpl-r1" and parsed.model == MODEL and parsed.object == "chat.completion"
    assert parsed.choices[0].message.content == "Hello there" and parsed.choices[0].message.role == "assistant"
    assert parsed.choices[0].finish_reason == "length"
    assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens, parsed.usage.total_tokens) == (20, 4, 24)
    assert body["mmserve"]["timings"]["ttft_ms"] == 12.5 and body["mmserve"]["num_media_cached"] == 1
    assert body["mmserve"]["request_id"] == "r1" and "finish_reason" not in body["mmserve"]


def test_chunks_are_what_the_openai_client_parses():
    role = ChatCompletionChunk.model_validate(chunk_json("c", MODEL, 1, {"role": "assistant", "content": ""}))
    assert role.choices[0].delta.role == "assistant" and role.choices[0].finish_reason is None
    text = ChatCompletionChunk.model_validate(chunk_json("c", MODEL, 1, {"content": "Hi"}))
    assert text.choices[0].delta.content == "Hi" and text.object == "chat.completion.chunk"
    assert ChatCompletionChunk.model_validate(chunk_json("c", MODEL, 1, {}, "stop")).choices[0].finish_reason == "stop"
    usage = ChatCompletionChunk.model_validate(chunk_json("c", MODEL, 1, None, usage={"prompt_tokens": 1,
                                                          "completion_tokens": 2, "total_tokens": 3}))
    assert usage.choices == [] and usage.usage.total_tokens == 3


def test_sse_events_are_one_data_line_each():
    event = sse({"content": "two\nlines ü"})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
    assert json.loads(event[len(b"data: "):]) == {"content": "two\nlines ü"}
    assert sse("[DONE]") == b"data: [DONE]\n\n"


def test_served_model_name_and_loopback_address(tmp_path):
    model_dir = tmp_path / "tiny-qwen"
    model_dir.mkdir()

    def config(**kw) -> RouterConfig:
        return RouterConfig(decoder_addrs="a:1", encoder_addrs="a:2", llm_addrs="a:3", **kw)

    assert served_model_name(config(model=str(model_dir) + "/")) == "tiny-qwen"
    assert served_model_name(config(model="Qwen/Qwen2.5-VL-3B-Instruct")) == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert served_model_name(config(model=str(model_dir), served_model_name="qwen")) == "qwen"
    with pytest.raises(ValueError, match="http_port"):
        config(model="m", http_port=70000)
    assert loopback_address("0.0.0.0", 5) == "127.0.0.1:5"
    assert loopback_address("::", 5) == "[::1]:5"
    assert loopback_address("10.0.0.2", 5) == "10.0.0.2:5"


def test_mmserve_up_http_port_reaches_the_router_command_line():
    args = build_parser().parse_args(["up", "--model", "m", "--http-port", "8000"])
    assert args.http_port == 8000
    children = plan(StackSpec(model="m", redis_url="redis://127.0.0.1:1/0", http_port=args.http_port)).children()
    router = RouterConfig.parse(next(c for c in children if c.name == "router").argv[3:])
    assert router.http_port == 8000
    children = plan(StackSpec(model="m", redis_url="redis://127.0.0.1:1/0")).children()
    assert RouterConfig.parse(next(c for c in children if c.name == "router").argv[3:]).http_port == 0


def test_logprobs_and_top_logprobs_become_sampling_fields_under_the_cap():
    sampling = parse(GOOD, logprobs=True, top_logprobs=20).grpc_request.sampling
    assert (sampling.logprobs, sampling.top_logprobs) == (True, 20)
    assert not parse(GOOD, logprobs=False, top_logprobs=0).grpc_request.sampling.logprobs
    with pytest.raises(ApiError) as info:
        parse_chat_request({**GOOD, "logprobs": True, "top_logprobs": 3}, model_name=MODEL, request_id="r1",
                           max_top_logprobs=2)
    assert info.value.param == "top_logprobs" and "[0, 2]" in info.value.message


def logprob(token_id: int, value: float, token_bytes: bytes) -> api_pb2.TokenLogprob:
    return api_pb2.TokenLogprob(token_id=token_id, logprob=value, text=token_bytes.decode(errors="replace"),
                                token_bytes=token_bytes)


def test_logprobs_are_what_the_openai_client_parses():
    entries = [api_pb2.TokenLogprobs(chosen=logprob(5, -0.25, b"\xc3"), top=[logprob(5, -0.25, b"\xc3"),
                                                                             logprob(9, float("-inf"), b" x")]),
               api_pb2.TokenLogprobs(chosen=logprob(6, -1.5, b"\xa9"))]
    body = json.loads(json.dumps(completion_json("c", MODEL, 1, "é", final(), logprobs_json(entries))))
    content = ChatCompletion.model_validate(body).choices[0].logprobs.content
    assert [(c.token, c.logprob, c.bytes) for c in content] == [("\ufffd", -0.25, [0xC3]), ("\ufffd", -1.5, [0xA9])]
    assert bytes(content[0].bytes + content[1].bytes).decode() == "é"  # the bytes join what the texts cannot
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [("\ufffd", -0.25), (" x", -9999.0)]
    assert content[1].top_logprobs == []
    chunk = ChatCompletionChunk.model_validate(chunk_json("c", MODEL, 1, {"content": ""}, logprobs=logprobs_json(
        entries[1:])))
    assert chunk.choices[0].logprobs.content[0].logprob == -1.5
    assert completion_json("c", MODEL, 1, "x", final())["choices"][0]["logprobs"] is None
