"""One scheduling loop: each step hands out {sequence: num_new_tokens} under a token budget."""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable

from services.llm.block_manager import BlockManager
from services.llm.sequence import Sequence, SeqStatus
from services.llm.step_budget import StepBudget


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    """num_new_tokens of seq, starting at seq.num_computed_tokens, run this step."""

    seq: Sequence
    num_new_tokens: int

    @property
    def completes_sequence(self) -> bool:
        """True when after this chunk every token has KV, so the step samples a new token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    """Running sequences first (decodes before prefill chunks), then admits waiting ones.

    Long prompts are chunked by the budget, and by step_budget while sequences with a time-per-token target
    decode, so decodes never stall behind them nor fall behind their targets; when KV blocks run out the
    lowest-priority running sequence is preempted (freed, recomputed later). A sequence waiting for a media chunk
    keeps its blocks and is skipped until the chunk arrives; it is preempted last, and since its consumed media are
    gone it is then dropped (listed in `dropped`) rather than queued for recomputation.
    A streamed prompt takes its blocks before its first chunk only while the cache has room to spare.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 step_budget: StepBudget | None = None, clock: Callable[[], float] = time.monotonic):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.step_budget = step_budget
        self.clock = clock
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.dropped: list[Sequence] = []  # streamed sequences preempted since the engine last looked

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def fits(self, seq: Sequence) -> bool:
        """Whether seq could ever run: its prompt plus max_tokens fit the whole KV cache."""
        needed = self.block_manager.num_blocks_for(seq.num_tokens + seq.sampling.max_tokens)
        return needed <= self.block_manager.num_blocks

    def add(self, seq: Sequence) -> None:
        """Queues a new sequence."""
        self.waiting.append(seq)

    def schedule(self) -> list[ScheduledChunk]:
        """Picks this step's work."""
        budget = self.max_num_batched_tokens
        prefill_budget = self._prefill_budget()
        chunks: list[ScheduledChunk] = []
        self.running.sort(key=lambda s: (s.num_uncomputed_tokens > 1, *s.sort_key()))
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            is_decoding = seq.is_decoding
            n = min(seq.num_schedulable_tokens, budget if is_decoding else min(budget, prefill_budget))
            if n == 0:
                continue  # waiting for a media chunk (it keeps its blocks), or no prefill room left this step
            if not self._make_room(seq, seq.num_computed_tokens + n):
                continue
            self.block_manager.allocate(seq, seq.num_computed_tokens + n)
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
            if not is_decoding:
                prefill_budget -= n
        self._admit(chunks, min(budget, prefill_budget))
        return chunks

    def _prefill_budget(self) -> int:
        """Prompt tokens this step may take beside the sequences decoding now (step_budget)."""
        if self.step_budget is None:
            return self.max_num_batched_tokens
        return self.step_budget.prefill_tokens([seq for seq in self.running if seq.is_decoding], self.clock())

    def _admit(self, chunks: list[ScheduledChunk], budget: int) -> None:
        ordered = sorted(self.waiting, key=Sequence.sort_key)
        for seq in ordered:
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if seq.is_streamed and 0 in seq.pending_media and not self._has_room_to_wait(seq):
                continue  # holds nothing until its first media chunk comes: the cache is needed by what can run
            if not seq.block_table:
                seq.num_cached_tokens = seq.num_computed_tokens = self.block_manager.allocate_cached_prefix(seq)
            n = min(seq.num_schedulable_tokens, budget)
            # A streamed prompt takes the blocks of all of it at once: its later chunks must never wait for
            # blocks that other streamed prompts hold while they wait for theirs.
            num_tokens = max(seq.num_computed_tokens + n, seq.num_prompt_tokens if seq.is_streamed else 0)
            if not self.block_manager.can_allocate(seq, num_tokens):
                self.block_manager.free(seq)  # holding cached blocks while waiting could starve others
                seq.num_computed_tokens = 0
                break
            self.block_manager.allocate(seq, num_tokens)
            self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            if n:  # else its cached prefix reaches a media chunk still missing
                chunks.append(ScheduledChunk(seq, n))
                budget -= n

    def _has_room_to_wait(self, seq: Sequence) -> bool:
        """Whether a streamed prompt may take its blocks before any of its media arrived (to compute the text
        before them at once): only while half the cache would stay free. Under load its clip may take seconds to
        decode and encode, and prompts waiting for theirs would hold the blocks that running ones need (or that
        preempt them)."""
        needed = self.block_manager.num_blocks_for(seq.num_prompt_tokens)
        return self.block_manager.num_free_blocks - needed >= self.block_manager.num_blocks // 2

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Preempts lower-priority sequences until seq fits; False if seq itself had to go."""
        while not self.block_manager.can_allocate(seq, num_tokens):
            victim = max((s for s in self.running if s.status is SeqStatus.RUNNING),
                         key=lambda s: (not s.is_streamed, *s.sort_key()))
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Frees seq's KV and puts it back at the head of the queue to be recomputed (a streamed one: dropped)."""
        if seq.is_streamed:
            self.finish(seq, "preempted")
            self.dropped.append(seq)
            return
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, chunks: list[ScheduledChunk], new_tokens: dict[Sequence, int]) -> None:
        """Advances computed counts and appends sampled tokens."""
        for chunk in chunks:
            chunk.seq.num_computed_tokens += chunk.num_new_tokens
        now = self.clock()
        for seq, token in new_tokens.items():
            seq.token_ids.append(token)
            seq.first_token_at = seq.first_token_at or now
        for chunk in chunks:
            self.block_manager.register_computed(chunk.seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends seq (done, stopped or aborted) and frees its blocks at once."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
