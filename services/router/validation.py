"""Checks a GenerateRequest before any work and names the first problem (plain Python)."""

from __future__ import annotations

import dataclasses
import math

from mmserve import request_ids
from mmserve.media import sizing
from mmserve.sampling import DEFAULT_MAX_TOP_LOGPROBS, sampling_from_proto
from mmserve.v1 import api_pb2

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """The server's caps on one request; what a client asks for is checked against them, never trusted."""

    max_messages: int
    max_media: int
    max_tokens_limit: int
    max_media_bytes: int
    max_frames: int = sizing.FPS_MAX_FRAMES  # frames sampled from one video
    min_pixels: int = sizing.MIN_PIXELS  # the model's bounds on an image's (or a frame's) pixel budget ...
    max_pixels: int = sizing.MAX_PIXELS  # ... which a request may narrow, never widen
    max_slo_ttft_ms: dict[str, float] = dataclasses.field(default_factory=dict)  # by request class; absent: open
    max_slo_tpot_ms: float = 0.0  # 0: open
    max_top_logprobs: int = DEFAULT_MAX_TOP_LOGPROBS  # alternatives at each token


class ValidationError(ValueError):
    """A request the router refuses with INVALID_ARGUMENT."""


def validate_request(request: api_pb2.GenerateRequest, limits: RequestLimits) -> None:
    """Raises ValidationError naming the first field that is wrong."""
    if request.request_id and not request_ids.is_valid(request.request_id):
        raise ValidationError(f"request_id: at most {request_ids.MAX_CHARS} letters, digits and ._:- characters")
    max_messages, max_media = limits.max_messages, limits.max_media
    if not request.messages:
        raise ValidationError("messages: empty")
    if len(request.messages) > max_messages:
        raise ValidationError(f"messages: {len(request.messages)} exceed the limit of {max_messages}")
    num_media = 0
    kinds: set[str] = set()
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        if message.role not in ROLES:
            raise ValidationError(f"{where}.role: unknown role {message.role!r} (expected system, user or assistant)")
        if not message.parts:
            raise ValidationError(f"{where}.parts: empty")
        for j, part in enumerate(message.parts):
            kind = part.WhichOneof("content")
            if kind is None:
                raise ValidationError(f"{where}.parts[{j}]: no text, image or video")
            if kind == "text":
                continue
            if message.role != "user":
                raise ValidationError(f"{where}.parts[{j}].{kind}: media is only allowed in user messages")
            num_media += 1
            kinds.add(kind)
            _validate_media(getattr(part, kind), f"{where}.parts[{j}].{kind}", limits)
    if num_media > max_media:
        raise ValidationError(f"messages: {num_media} media items exceed the limit of {max_media}")
    _validate_sampling(request.sampling, limits)
    _validate_slo(request.slo, "video" if "video" in kinds else "image" if "image" in kinds else "text", limits)


def _validate_media(media: api_pb2.Media, where: str, limits: RequestLimits) -> None:
    max_media_bytes = limits.max_media_bytes
    source = media.WhichOneof("source")
    if source is None:
        raise ValidationError(f"{where}: neither data nor uri")
    if source == "data" and not media.data:
        raise ValidationError(f"{where}.data: empty")
    if source == "data" and len(media.data) > max_media_bytes:
        raise ValidationError(f"{where}.data: {len(media.data)} bytes exceed the limit of {max_media_bytes}")
    if source == "uri" and not media.uri:
        raise ValidationError(f"{where}.uri: empty")
    if media.HasField("fps") and not (math.isfinite(media.fps) and 0 < media.fps <= 60):
        raise ValidationError(f"{where}.fps: {media.fps} is not in (0, 60]")
    if media.HasField("max_frames") and not 2 <= media.max_frames <= limits.max_frames:
        raise ValidationError(f"{where}.max_frames: {media.max_frames} is not in [2, {limits.max_frames}]")
    if media.HasField("min_pixels") and media.HasField("max_pixels") and media.min_pixels > media.max_pixels:
        raise ValidationError(f"{where}: min_pixels is larger than max_pixels")
    if media.HasField("max_pixels") and media.max_pixels < 28 * 28:
        raise ValidationError(f"{where}.max_pixels: below one 28x28 patch")
    for name in ("min_pixels", "max_pixels"):
        if media.HasField(name) and not limits.min_pixels <= getattr(media, name) <= limits.max_pixels:
            raise ValidationError(f"{where}.{name}: {getattr(media, name)} is outside the server's bounds "
                                  f"[{limits.min_pixels}, {limits.max_pixels}] (a request may narrow them, "
                                  "never widen them)")


def _validate_sampling(s: api_pb2.SamplingParams, limits: RequestLimits) -> None:
    try:
        options = sampling_from_proto(s)  # the llm's own checks, applied before any work
    except ValueError as err:
        raise ValidationError(str(err)) from None
    if options.max_tokens > (cap := limits.max_tokens_limit):
        raise ValidationError(f"sampling.max_tokens: {options.max_tokens} is not in [1, {cap}]")
    if options.top_logprobs > (cap := limits.max_top_logprobs):
        raise ValidationError(f"sampling.top_logprobs: {options.top_logprobs} is not in [0, {cap}]")


def _validate_slo(slo: api_pb2.Slo, cls: str, limits: RequestLimits) -> None:
    """A request may ask for a tighter SLO than the server's, not an unbounded one (it would be admitted
    whatever the backlog and then hold the stages for as long as it likes)."""
    max_ttft_ms = limits.max_slo_ttft_ms.get(cls, 0.0)
    if max_ttft_ms and slo.ttft_ms > max_ttft_ms:
        raise ValidationError(f"slo.ttft_ms: {slo.ttft_ms} exceeds the limit of {max_ttft_ms:g} ms for {cls} "
                              "requests")
    if limits.max_slo_tpot_ms and slo.tpot_ms > limits.max_slo_tpot_ms:
        raise ValidationError(f"slo.tpot_ms: {slo.tpot_ms} exceeds the limit of {limits.max_slo_tpot_ms:g} ms")
