"""`mmserve generate`: a streaming client of the public Router API."""

from __future__ import annotations

import pathlib
import sys
import urllib.parse

import grpc

from mmserve import rpc, tls
from mmserve.v1 import api_pb2, api_pb2_grpc


def media_from_arg(value: str, **options) -> api_pb2.Media:
    """A local file is sent as bytes; a URL (file://, http(s)://) is passed for the server to fetch."""
    options = {k: v for k, v in options.items() if v is not None}
    if urllib.parse.urlparse(value).scheme in ("file", "http", "https"):
        return api_pb2.Media(uri=value, **options)
    return api_pb2.Media(data=pathlib.Path(value).read_bytes(), **options)


def build_request(prompt: str, images: list[str], videos: list[str], *, max_tokens: int, temperature: float,
                  seed: int | None = None, system: str | None = None, logprobs: bool = False, top_logprobs: int = 0,
                  **video_options) -> api_pb2.GenerateRequest:
    """A one-turn request: media first, then the prompt text (the order Qwen2.5-VL was trained on); logprobs asks
    for each token's log-probability, top_logprobs for that many alternatives at each step too."""
    parts = [api_pb2.Part(image=media_from_arg(p)) for p in images]
    parts += [api_pb2.Part(video=media_from_arg(p, **video_options)) for p in videos]
    parts.append(api_pb2.Part(text=prompt))
    messages = [api_pb2.Message(role="system", parts=[api_pb2.Part(text=system)])] if system else []
    messages.append(api_pb2.Message(role="user", parts=parts))
    sampling = api_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                      logprobs=logprobs, top_logprobs=top_logprobs)
    if seed is not None:
        sampling.seed = seed
    return api_pb2.GenerateRequest(messages=messages, sampling=sampling)


def format_final(final: api_pb2.Final) -> str:
    """The timing table printed after the answer."""
    t = final.timings
    rows = [("queue", t.queue_ms), ("decode", t.decode_ms), ("encode", t.encode_ms), ("prefill", t.prefill_ms),
            ("ttft", t.ttft_ms), ("tpot", t.tpot_ms), ("total", t.total_ms)]
    lines = [f"{'stage':<10}{'ms':>10}", *(f"{name:<10}{value:>10.1f}" for name, value in rows)]
    lines.append(f"finish={final.finish_reason} prompt_tokens={final.prompt_tokens} "
                 f"completion_tokens={final.completion_tokens} "
                 f"media_cached={final.num_media_cached}/{final.num_media}")
    return "\n".join(lines)


def format_logprobs(entry: api_pb2.TokenLogprobs) -> str:
    """One line per generated token: its text and log-probability, then the alternatives."""
    top = "  ".join(f"{t.text!r} {t.logprob:.4f}" for t in entry.top)
    return f"{entry.chosen.text!r} {entry.chosen.logprob:.4f}" + (f"  | {top}" if top else "")


def open_channel(addr: str, max_message_bytes: int, client_tls: tls.ClientTls | None = None) -> grpc.Channel:
    """A blocking channel to the router: TLS when client_tls is given, else plaintext."""
    options = rpc.message_options(max_message_bytes)
    if client_tls is None:
        return grpc.insecure_channel(addr, options=options)
    return grpc.secure_channel(addr, client_tls.credentials(), options=[*options, *client_tls.options()])


def run_generate(addr: str, request: api_pb2.GenerateRequest, timeout_s: float, max_message_bytes: int,
                 client_tls: tls.ClientTls | None = None, token: str | None = None) -> int:
    """Streams the answer to stdout and the timing table after it (and, when asked, each token's
    log-probabilities after the answer); returns the exit code."""
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    logprobs = []
    with open_channel(addr, max_message_bytes, client_tls) as channel:
        stub = api_pb2_grpc.RouterStub(channel)
        try:
            for reply in stub.Generate(request, timeout=timeout_s, metadata=metadata):
                if reply.WhichOneof("event") == "delta":
                    sys.stdout.write(reply.delta.text)
                    sys.stdout.flush()
                    logprobs += reply.delta.logprobs
                else:
                    if logprobs:
                        print("\n\n" + "\n".join(map(format_logprobs, logprobs)), end="")
                    print("\n\n" + format_final(reply.final))
        except grpc.RpcError as err:
            print(f"\nerror: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    return 0
