"""A request's state inside the LLM engine (plain Python, no torch)."""

from __future__ import annotations

import dataclasses
import enum
import itertools
import time
from typing import Any


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Validated sampling settings of one request."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0

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
        if any(not s for s in self.stop):
            raise ValueError("sampling.stop: empty stop string")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


_arrival_counter = itertools.count()


@dataclasses.dataclass(eq=False)
class Sequence:
    """Prompt plus generated tokens, how many of them have KV in the cache, and where."""

    seq_id: str
    token_ids: list[int]
    sampling: SamplingOptions
    # Lower runs first; the router passes deadlines here (earliest first).
    priority: float = 0.0
    # Engine-specific multimodal data (embeddings, M-RoPE positions); opaque to the scheduler.
    mm: Any = None
    # (start, end, digest) of each media item's placeholder tokens: media identity for prefix caching.
    media_spans: list[tuple[int, int, str]] = dataclasses.field(default_factory=list)
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    block_table: list[int] = dataclasses.field(default_factory=list)
    # Hash of each full, computed block of block_table, in order.
    block_hashes: list[bytes] = dataclasses.field(default_factory=list)
    # Prompt tokens whose KV came from the prefix cache at admission.
    num_cached_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    arrival_order: int = dataclasses.field(default_factory=lambda: next(_arrival_counter))

    def __post_init__(self) -> None:
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def sort_key(self) -> tuple[float, int]:
        return (self.priority, self.arrival_order)
