"""OpenAI chat-completions JSON ↔ the router's gRPC messages, and gRPC status → HTTP error (plain functions)."""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
from collections.abc import Iterable
from typing import Any, NamedTuple

import grpc

from mmserve.sampling import DEFAULT_MAX_TOP_LOGPROBS
from mmserve.v1 import api_pb2
from services.router import json_body
from services.router.config import RouterConfig

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MEDIA_PARTS = {"image_url": "image", "video_url": "video"}
URI_SCHEMES = ("http://", "https://", "file://")
UINT32, UINT64 = 2**32 - 1, 2**64 - 1
# Accepted and without effect on the answer.
HARMLESS_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "user", "metadata", "store",
                             "service_tier", "parallel_tool_calls"})
# Fields whose other values ask for something we do not do: the values that are fine.
UNSUPPORTED_UNLESS = {
    "n": (None, 1), "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "logit_bias": (None, {}), "response_format": (None, {"type": "text"}), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
}
SAMPLING_FIELDS = frozenset({"max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
                             "top_k", "min_tokens", "fps", "max_frames", "logprobs", "top_logprobs"})
# mmserve extras mapped to GenerateRequest.slo (targets in ms; 0 or absent: the router's default for the class).
SLO_FIELDS = frozenset({"ttft_ms", "tpot_ms", "allow_degrade"})
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(param: str, problem: str) -> ApiError:
    """A 400 naming the request field at fault."""
    return ApiError(400, f"{param}: {problem}", param=param, code="invalid_argument")


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def error_from_grpc(code: grpc.StatusCode, details: str | None, trailing: Iterable[tuple[str, Any]] | None) -> ApiError:
    """The HTTP error for a gRPC status; RESOURCE_EXHAUSTED's retry-after-ms becomes Retry-After."""
    status, kind = HTTP_STATUS.get(code, (500, "internal_error"))
    headers = {}
    for key, value in trailing or ():
        if key == "retry-after-ms" and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            try:
                ms = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(ms) and ms >= 0:
                headers = {"Retry-After": str(math.ceil(ms / 1000)), "retry-after-ms": str(math.ceil(ms))}
    return ApiError(status, details or code.name, type=kind, code=code.name.lower(), headers=headers)


class ChatRequest(NamedTuple):
    """A parsed chat-completions request."""

    grpc_request: api_pb2.GenerateRequest
    stream: bool
    include_usage: bool


def parse_chat_body(raw: bytes, *, model_name: str, request_id: str, max_top_logprobs: int = DEFAULT_MAX_TOP_LOGPROBS) -> ChatRequest:
    """A chat-completions HTTP body as a GenerateRequest; raises ApiError naming the field at fault."""
    try:
        body = json_body.decode(raw)
    except json_body.JsonBodyError as err:
        raise bad_request(err.param, err.problem) from None
    return parse_chat_request(body, model_name=model_name, request_id=request_id, max_top_logprobs=max_top_logprobs)


def parse_chat_request(body: Any, *, model_name: str, request_id: str, max_top_logprobs: int = DEFAULT_MAX_TOP_LOGPROBS) -> ChatRequest:
    """A decoded chat-completions body as a GenerateRequest; raises ApiError naming the field at fault."""
    if not isinstance(body, dict):
        raise bad_request("body", "must be a JSON object")
    for name, value in body.items():
        if name in UNSUPPORTED_UNLESS:
            if value not in UNSUPPORTED_UNLESS[name]:
                raise bad_request(name, f"{value!r} is not supported")
        elif name not in HARMLESS_FIELDS and name not in SAMPLING_FIELDS and name not in SLO_FIELDS:
            raise bad_request(name, "unrecognized request argument")
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(404, f"model: {model!r} does not exist (this server serves {model_name!r})",
                       param="model", code="model_not_found", type="not_found_error")
    stream = _optional(body, "stream", bool, "stream") or False
    options = _optional(body, "stream_options", dict, "stream_options") or {}
    include_usage = _optional(options, "include_usage", bool, "stream_options.include_usage") or False
    messages = _messages(body.get("messages"), _video_options(body, ""))
    sampling = _sampling(body, max_top_logprobs)
    return ChatRequest(api_pb2.GenerateRequest(request_id=request_id, messages=messages, sampling=sampling,
                                               slo=_slo(body)), stream, include_usage)


def _optional(obj: dict, key: str, kind: type, where: str) -> Any:
    value = obj.get(key)
    if value is not None and not isinstance(value, kind):
        raise bad_request(where, f"must be {'an object' if kind is dict else 'a ' + kind.__name__}")
    return value


def _int(obj: dict, key: str, lo: int, hi: int, where: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad_request(where, "must be an integer")
    if not lo <= value <= hi:
        raise bad_request(where, f"{value} is not in [{lo}, {hi}]")
    return value


def _number(obj: dict, key: str, where: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise bad_request(where, "must be a number")
    return float(value)


def _sampling(body: dict, max_top_logprobs: int) -> api_pb2.SamplingParams:
    s = api_pb2.SamplingParams()
    logprobs = _optional(body, "logprobs", bool, "logprobs")
    top_logprobs = _int(body, "top_logprobs", 0, max_top_logprobs, "top_logprobs")
    if top_logprobs and not logprobs:
        raise bad_request("top_logprobs", "needs logprobs: true")
    max_tokens = _int(body, "max_completion_tokens", 1, UINT32, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1, UINT32, "max_tokens")
    top_k = _int(body, "top_k", -1, UINT32, "top_k")  # -1 means off, as in vLLM
    fields = {"max_tokens": max_tokens, "temperature": _number(body, "temperature", "temperature"),
              "top_p": _number(body, "top_p", "top_p"), "seed": _int(body, "seed", 0, UINT64, "seed"),
              "top_k": top_k if top_k != -1 else None, "min_tokens": _int(body, "min_tokens", 0, UINT32, "min_tokens"),
              "logprobs": logprobs, "top_logprobs": top_logprobs}
    for name, value in fields.items():
        if value is not None:
            setattr(s, name, value)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(x, str) for x in stop)):
        raise bad_request("stop", "must be a string or a list of strings")
    s.stop.extend(stop or ())
    return s


def _slo(body: dict) -> api_pb2.Slo | None:
    ttft_ms, tpot_ms = _int(body, "ttft_ms", 0, UINT32, "ttft_ms"), _int(body, "tpot_ms", 0, UINT32, "tpot_ms")
    allow_degrade = _optional(body, "allow_degrade", bool, "allow_degrade")
    if ttft_ms is None and tpot_ms is None and allow_degrade is None:
        return None
    return api_pb2.Slo(ttft_ms=ttft_ms or 0, tpot_ms=tpot_ms or 0, allow_degrade=allow_degrade or False)


def _video_options(obj: dict, where: str) -> dict:
    options = {"fps": _number(obj, "fps", where + "fps"), "max_frames": _int(obj, "max_frames", 0, UINT32,
                                                                              where + "max_frames")}
    return {k: v for k, v in options.items() if v is not None}


def _messages(value: Any, video_defaults: dict) -> list[api_pb2.Message]:
    if not isinstance(value, list) or not value:
        raise bad_request("messages", "must be a non-empty list")
    messages = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(where, "must be an object")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad_request(f"{where}.role", f"unsupported role {role!r} (expected system, user or assistant)")
        if m.get("tool_calls"):
            raise bad_request(f"{where}.tool_calls", "tool calls are not supported")
        content = m.get("content")
        if isinstance(content, str):
            parts = [api_pb2.Part(text=content)]
        elif isinstance(content, list) and content:
            parts = [_part(p, f"{where}.content[{j}]", video_defaults) for j, p in enumerate(content)]
        else:
            raise bad_request(f"{where}.content", "must be a string or a non-empty list of parts")
        messages.append(api_pb2.Message(role=ROLES[role], parts=parts))
    return messages


def _part(p: Any, where: str, video_defaults: dict) -> api_pb2.Part:
    if not isinstance(p, dict):
        raise bad_request(where, "must be an object")
    kind = p.get("type")
    if kind == "text":
        if not isinstance(p.get("text"), str):
            raise bad_request(f"{where}.text", "must be a string")
        return api_pb2.Part(text=p["text"])
    if not isinstance(kind, str) or kind not in MEDIA_PARTS:
        raise bad_request(f"{where}.type", f"unsupported part type {kind!r} (expected text, image_url or video_url)")
    ref = p.get(kind)
    ref = {"url": ref} if isinstance(ref, str) else ref  # some clients send the bare URL
    if not isinstance(ref, dict) or not isinstance(ref.get("url"), str):
        raise bad_request(f"{where}.{kind}.url", "must be a string")
    media = media_from_url(ref["url"], f"{where}.{kind}.url")
    if kind == "video_url":
        for name, value in {**video_defaults, **_video_options(ref, f"{where}.{kind}.")}.items():
            setattr(media, name, value)
    return api_pb2.Part(**{MEDIA_PARTS[kind]: media})


def media_from_url(url: str, where: str) -> api_pb2.Media:
    """data: URLs become inline bytes; http(s):// and file:// URLs go to the router to fetch."""
    if url.startswith("data:"):
        header, comma, payload = url[len("data:"):].partition(",")
        if not comma or not header.endswith(";base64"):
            raise bad_request(where, "a data URL must look like data:<mime>;base64,<data>")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(where, "invalid base64 data") from None
        if not data:
            raise bad_request(where, "empty data")
        return api_pb2.Media(data=data)
    if url.startswith(URI_SCHEMES):
        return api_pb2.Media(uri=url)
    raise bad_request(where, "expected a data:, http(s):// or file:// URL")


def usage_json(final: api_pb2.Final) -> dict:
    return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
            "total_tokens": final.prompt_tokens + final.completion_tokens}


def mmserve_json(final: api_pb2.Final) -> dict:
    """Our extras beside the OpenAI fields: every other field of Final (timings in ms, cache hits, ...)."""
    extras = {f.name: getattr(final, f.name) for f in final.DESCRIPTOR.fields
              if f.message_type is None and f.name not in ("finish_reason", "prompt_tokens", "completion_tokens")}
    extras["timings"] = {f.name: getattr(final.timings, f.name) for f in final.timings.DESCRIPTOR.fields}
    return extras


def completion_json(chat_id: str, model: str, created: int, text: str, final: api_pb2.Final,
                    logprobs: dict | None = None) -> dict:
    """The non-streaming `chat.completion` object (logprobs: openai_logprobs.logprobs_json's, when asked)."""
    return {"id": chat_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                         "finish_reason": final.finish_reason or "stop"}],
            "usage": usage_json(final), "mmserve": mmserve_json(final)}


def chunk_json(chat_id: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None,
               logprobs: dict | None = None, **extra: Any) -> dict:
    """One `chat.completion.chunk`; delta None gives the choice-less usage chunk."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]
    return {"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, **extra}


def sse(obj: Any) -> bytes:
    return f"data: {obj if isinstance(obj, str) else dumps(obj)}\n\n".encode()


def served_model_name(config: RouterConfig) -> str:
    """The configured name, else the checkpoint directory's name (or the hub id)."""
    if config.served_model_name:
        return config.served_model_name
    return os.path.basename(os.path.normpath(config.model)) if os.path.isdir(config.model) else config.model


def loopback_address(host: str, port: int) -> str:
    """Where this process reaches its own gRPC server."""
    if host in ("", "0.0.0.0"):
        return f"127.0.0.1:{port}"
    if host in ("::", "[::]"):
        return f"[::1]:{port}"
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
