"""The Locust entries one Generate stream produces: client TTFT, TPOT, e2e, and the router's stage timings."""

from __future__ import annotations

import dataclasses

from mmserve.v1 import api_pb2

CLIENT = "grpc"  # measured by the load generator
ROUTER = "router"  # Final.timings, measured by the router from when it accepted the request
NO_FINAL = "NO_FINAL"  # the stream ended without its final message
_CLIENT_TIMINGS = frozenset({"ttft_ms", "tpot_ms", "total_ms"})  # the client's own entries cover these
_ALWAYS = frozenset({"queue_ms", "prefill_ms"})  # every request has them; the rest are media stages


@dataclasses.dataclass(frozen=True)
class Sample:
    """One Locust request event: response_time in ms (None: not a latency sample); error is a failure kind."""

    request_type: str
    name: str
    response_time: float | None
    response_length: int = 0
    error: str | None = None


@dataclasses.dataclass
class StreamTimes:
    """Client-side times (seconds, one monotonic clock) of one Generate stream."""

    start: float
    first_delta: float | None = None
    end: float | None = None
    num_tokens: int = 0
    final: api_pb2.Final | None = None

    def on_reply(self, reply: api_pb2.GenerateResponse, now: float) -> None:
        """Notes one streamed message."""
        if reply.WhichOneof("event") == "delta":
            if self.first_delta is None:
                self.first_delta = now
            self.num_tokens += len(reply.delta.token_ids)
        elif reply.WhichOneof("event") == "final":
            self.final = reply.final


def completed_samples(kind: str, t: StreamTimes) -> list[Sample]:
    """Entries of a stream that ended: "ttft <kind>", "tpot <kind>", "e2e <kind>" and the router's stages.

    TPOT is the time after the first delta divided by the tokens after the first, as vLLM's benchmarks
    count it; a stream of one token has none. The e2e entry's length is the number of completion tokens.
    """
    assert t.end is not None
    if t.final is None:
        return failed_samples(kind, t, NO_FINAL)
    final = t.final
    num_tokens = final.completion_tokens or t.num_tokens
    out = []
    if t.first_delta is not None:
        out.append(Sample(CLIENT, f"ttft {kind}", (t.first_delta - t.start) * 1e3))
        if num_tokens > 1:
            out.append(Sample(CLIENT, f"tpot {kind}", (t.end - t.first_delta) * 1e3 / (num_tokens - 1)))
    out.append(Sample(CLIENT, f"e2e {kind}", (t.end - t.start) * 1e3, num_tokens))
    return out + router_samples(kind, final)


def router_samples(kind: str, final: api_pb2.Final) -> list[Sample]:
    """One "<stage> <kind>" entry per Timings field the client does not measure itself: queue and prefill
    always, the media stages (decode, encode, ...) when the request had a medium that was not cached."""
    has_media_work = final.num_media > final.num_media_cached
    return [Sample(ROUTER, f"{field.name.removesuffix('_ms')} {kind}", getattr(final.timings, field.name))
            for field in api_pb2.Timings.DESCRIPTOR.fields
            if field.name not in _CLIENT_TIMINGS and (field.name in _ALWAYS or has_media_work)]


def failed_samples(kind: str, t: StreamTimes, error: str) -> list[Sample]:
    """A failed stream counts as a failure of its "e2e <kind>" entry without a response time (Locust's None), so
    latency percentiles describe completed requests only; a TTFT already seen is still recorded."""
    assert t.end is not None
    out = [Sample(CLIENT, f"ttft {kind}", (t.first_delta - t.start) * 1e3)] if t.first_delta is not None else []
    return out + [Sample(CLIENT, f"e2e {kind}", None, t.num_tokens, error)]
