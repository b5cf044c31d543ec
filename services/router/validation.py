"""Checks a GenerateRequest before any work and names the first problem (plain Python)."""

from __future__ import annotations

import math

from mmserve.sampling import sampling_from_proto
from mmserve.v1 import api_pb2

ROLES = ("system", "user", "assistant")


class ValidationError(ValueError):
    """A request the router refuses with INVALID_ARGUMENT."""


def validate_request(request: api_pb2.GenerateRequest, *, max_messages: int, max_media: int,
                     max_tokens_limit: int, max_media_bytes: int) -> None:
    """Raises ValidationError naming the first field that is wrong."""
    if not request.messages:
        raise ValidationError("messages: empty")
    if len(request.messages) > max_messages:
        raise ValidationError(f"messages: {len(request.messages)} exceed the limit of {max_messages}")
    num_media = 0
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
            _validate_media(getattr(part, kind), f"{where}.parts[{j}].{kind}", max_media_bytes)
    if num_media > max_media:
        raise ValidationError(f"messages: {num_media} media items exceed the limit of {max_media}")
    _validate_sampling(request.sampling, max_tokens_limit)


def _validate_media(media: api_pb2.Media, where: str, max_media_bytes: int) -> None:
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
    if media.HasField("max_frames") and not 2 <= media.max_frames <= 768:
        raise ValidationError(f"{where}.max_frames: {media.max_frames} is not in [2, 768]")
    if media.HasField("min_pixels") and media.HasField("max_pixels") and media.min_pixels > media.max_pixels:
        raise ValidationError(f"{where}: min_pixels is larger than max_pixels")
    if media.HasField("max_pixels") and media.max_pixels < 28 * 28:
        raise ValidationError(f"{where}.max_pixels: below one 28x28 patch")


def _validate_sampling(s: api_pb2.SamplingParams, max_tokens_limit: int) -> None:
    try:
        options = sampling_from_proto(s)  # the llm's own checks, applied before any work
    except ValueError as err:
        raise ValidationError(str(err)) from None
    if options.max_tokens > max_tokens_limit:
        raise ValidationError(f"sampling.max_tokens: {options.max_tokens} is not in [1, {max_tokens_limit}]")
