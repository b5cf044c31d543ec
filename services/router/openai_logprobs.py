"""The router's per-token log-probabilities as OpenAI's `choices[].logprobs` object (plain functions)."""

from __future__ import annotations

from collections.abc import Iterable

from mmserve.v1 import api_pb2

# OpenAI's stand-in for a log-probability of -inf (JSON has no infinity).
MIN_LOGPROB = -9999.0


def logprobs_json(entries: Iterable[api_pb2.TokenLogprobs]) -> dict:
    """`{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": null}`."""
    return {"content": [{**_token_json(e.chosen), "top_logprobs": [_token_json(t) for t in e.top]} for e in entries],
            "refusal": None}


def _token_json(t: api_pb2.TokenLogprob) -> dict:
    return {"token": t.text, "logprob": max(t.logprob, MIN_LOGPROB), "bytes": list(t.token_bytes)}
