"""Request builders and stream collectors shared by the integration tests."""

from __future__ import annotations

import dataclasses

from mmserve.v1 import api_pb2


def text(s: str) -> api_pb2.Part:
    return api_pb2.Part(text=s)


def image(data: bytes) -> api_pb2.Part:
    return api_pb2.Part(image=api_pb2.Media(data=data))


def video(data: bytes, **options) -> api_pb2.Part:
    return api_pb2.Part(video=api_pb2.Media(data=data, **options))


def request(*parts: api_pb2.Part, num_tokens: int = 32, role: str = "user") -> api_pb2.GenerateRequest:
    """A greedy one-turn request that generates exactly num_tokens tokens."""
    return api_pb2.GenerateRequest(
        messages=[api_pb2.Message(role=role, parts=list(parts))],
        sampling=api_pb2.SamplingParams(max_tokens=num_tokens, min_tokens=num_tokens, temperature=0.0))


@dataclasses.dataclass
class Result:
    token_ids: list[int]
    text: str
    final: api_pb2.Final


def collect(router, req: api_pb2.GenerateRequest, timeout: float = 120) -> Result:
    """Runs one request to the end; asserts the stream ends with exactly one final message."""
    ids, chunks, finals = [], [], []
    for reply in router.Generate(req, timeout=timeout):
        assert not finals, "a message arrived after the final one"
        if reply.WhichOneof("event") == "delta":
            ids += reply.delta.token_ids
            chunks.append(reply.delta.text)
        else:
            finals.append(reply.final)
    assert len(finals) == 1
    return Result(ids, "".join(chunks), finals[0])
