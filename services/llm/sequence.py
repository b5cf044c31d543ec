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
