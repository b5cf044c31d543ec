"""Request builders, stream collectors, a metrics reader and stacks of our own, shared by the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import urllib.request
from collections.abc import Iterator

import grpc
import torch

from mmserve import rpc
from stack.launcher import Child, Stack
from mmserve.v1 import api_pb2, api_pb2_grpc


def assert_follows(tokens: list[int], expected: list[int], expected_logits: list[torch.Tensor], *, tie: float = 0.02,
                   logits: list[torch.Tensor] | None = None, close: float = 0.05) -> None:
    """Greedy tokens against a reference computed by other kernels in half precision: equal until a step where
    the reference's two best logits lie within tie (a share of its largest |logit|) of each other, where either
    token is right; given the tokens' own logits, these are within close of the reference's before that."""
    assert len(tokens) == len(expected)
    for i, (token, want) in enumerate(zip(tokens, expected)):
        scale = float(expected_logits[i].abs().max())
        if logits is not None:
            assert torch.allclose(logits[i], expected_logits[i], atol=close * scale), f"token {i}: logits differ"
        if token != want:
            top = expected_logits[i].topk(2).values
            margin = float(top[0] - top[1]) / scale
            assert margin < tie, f"token {i}: {token} != {want}, and the reference's margin was {margin:.3f}"
            return


@contextlib.contextmanager
def running(children: list[Child], timeout_s: float = 180) -> Iterator[Stack]:
    """The processes started and healthy; stopped on leaving."""
    stack = Stack(children)
    stack.start()
    try:
        asyncio.run(stack.wait_healthy(timeout_s))
        yield stack
    finally:
        stack.stop()


@contextlib.contextmanager
def router_stub(address: str) -> Iterator[api_pb2_grpc.RouterStub]:
    """A synchronous Router stub on address; its channel closed on leaving."""
    channel = grpc.insecure_channel(address, options=rpc.message_options(256 * 1024 * 1024))
    try:
        yield api_pb2_grpc.RouterStub(channel)
    finally:
        channel.close()


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
    logprobs: list[api_pb2.TokenLogprobs] = dataclasses.field(default_factory=list)  # when the request asked


def collect(router, req: api_pb2.GenerateRequest, timeout: float = 120) -> Result:
    """Runs one request to the end; asserts the stream ends with exactly one final message."""
    ids, chunks, finals, logprobs = [], [], [], []
    for reply in router.Generate(req, timeout=timeout):
        assert not finals, "a message arrived after the final one"
        if reply.WhichOneof("event") == "delta":
            ids += reply.delta.token_ids
            chunks.append(reply.delta.text)
            logprobs += reply.delta.logprobs
        else:
            finals.append(reply.final)
    assert len(finals) == 1
    return Result(ids, "".join(chunks), finals[0], logprobs)


def metric(port: int, name: str, **labels) -> float:
    """One sample from the Prometheus endpoint on 127.0.0.1:port (0.0 when the series does not exist yet)."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}{{{selector}}} (\S+)$" if selector else rf"^{name} (\S+)$", body, re.M)
    return float(match.group(1)) if match else 0.0


def reset_peak_rss(pid: int) -> None:
    """Starts a process's peak resident memory (VmHWM) again from its current RSS."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib(pid: int) -> float:
    """A process's peak resident memory (VmHWM), MiB."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024
