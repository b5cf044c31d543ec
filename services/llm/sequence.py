"""A request's state inside the LLM engine (plain Python, no torch)."""

from __future__ import annotations

import dataclasses
import enum
import itertools
import time
from typing import Any

from mmserve.sampling import SamplingOptions


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_arrival_counter = itertools.count()


@dataclasses.dataclass(eq=False)
class Sequence:
    """Prompt plus generated tokens, how many of them have KV in the cache, and where."""

    seq_id: str
    token_ids: list[int]
    sampling: SamplingOptions
    # Lower runs first; the router passes deadlines here (earliest first).
    priority: float = 0.0
    # The request's time-per-token target, ms (0: none): while it decodes, steps keep their prompt chunks to what
    # fits beside it (StepBudget).
    tpot_ms: float = 0.0
    # When its first output token was sampled (the scheduler's clock, seconds; 0: not yet).
    first_token_at: float = 0.0
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
    # Streamed media (GenerateStreamed): the prompt token range [start, end) of each media chunk not yet arrived,
    # by chunk, in prompt order. Prefill runs up to the first of them; the engine removes a chunk when it arrives.
    pending_media: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    # Its consumed media chunks are freed, so the sequence cannot be recomputed after a preemption.
    is_streamed: bool = False

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
    def num_schedulable_tokens(self) -> int:
        """Uncomputed tokens that can be computed now: up to the first prompt token whose media chunk is missing."""
        end = self.num_tokens
        for start, stop in self.pending_media.values():
            if stop > self.num_computed_tokens:
                end = max(start, self.num_computed_tokens)
                break
        return end - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Whether its next step computes one new token of its output (its prompt is done)."""
        return self.num_output_tokens > 0 and self.num_uncomputed_tokens == 1

    @property
    def is_waiting_for_media(self) -> bool:
        """Whether the sequence has nothing to compute until a media chunk arrives."""
        return bool(self.pending_media) and self.num_schedulable_tokens == 0

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def sort_key(self) -> tuple[float, int]:
        return (self.priority, self.arrival_order)
