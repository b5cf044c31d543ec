"""Sampling settings of a request: one definition and one set of checks for the router and the llm."""

from __future__ import annotations

import dataclasses

from mmserve.v1 import api_pb2

# What an unset SamplingParams.max_tokens means (documented in api.proto).
DEFAULT_MAX_TOKENS = 256
# Stop strings are matched on every delta and the longest one bounds how much text is held back.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
# The default of the router's cap on top_logprobs (OpenAI's own cap).
DEFAULT_MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Validated sampling settings of one request."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    logprobs: bool = False  # each token's log-probability under the model (before temperature and filters)
    top_logprobs: int = 0  # and the step's most likely tokens with theirs

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("sampling.max_tokens: must be at least 1")
        if not (self.temperature >= 0.0) or self.temperature > 100.0:
            raise ValueError(f"sampling.temperature: {self.temperature} is not in [0, 100]")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"sampling.top_p: {self.top_p} is not in (0, 1]")
        if self.top_k < 0:
            raise ValueError("sampling.top_k: must not be negative")
        if self.min_tokens > self.max_tokens:
            raise ValueError("sampling.min_tokens: larger than max_tokens")
        if self.top_logprobs < 0:
            raise ValueError("sampling.top_logprobs: must not be negative")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("sampling.top_logprobs: needs sampling.logprobs")
        if any(not s for s in self.stop):
            raise ValueError("sampling.stop: empty stop string")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"sampling.stop: {len(self.stop)} stop strings, over the limit of {MAX_STOP_STRINGS}")
        if (longest := max(map(len, self.stop), default=0)) > MAX_STOP_CHARS:
            raise ValueError(f"sampling.stop: a stop string of {longest} characters, over the limit of "
                             f"{MAX_STOP_CHARS}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def sampling_from_proto(p: api_pb2.SamplingParams) -> SamplingOptions:
    """Validated sampling options; unset fields take the API's documented defaults."""
    return SamplingOptions(
        max_tokens=p.max_tokens if p.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
        min_tokens=p.min_tokens,
        logprobs=p.logprobs,
        top_logprobs=p.top_logprobs,
    )
