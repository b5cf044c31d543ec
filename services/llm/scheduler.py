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
                 step_budget: StepBudget | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.step_budget = step_budget
        self.clock = clock
        self.wall_clock = wall_clock  # the clock of the priorities (deadlines, Unix seconds)
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
        """Picks this step's work: every decode, then prompt chunks by priority, running and waiting alike (a
        prompt that came during a long one's chunked prefill goes ahead of its next chunk if it is due sooner).

        A prompt whose first token is overdue (its priority, a deadline, has passed) goes after those that can
        still make theirs: it has missed already, and while decodes leave prompts little room a few overdue
        images would otherwise hold back every text that comes after them, step after step. Priorities that
        are arrival times (fcfs) have all passed, so their order stays as it was."""
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        self.running.sort(key=Sequence.sort_key)
        decoding = [seq for seq in self.running if seq.is_decoding]
        prefill_budget = self._prefill_budget(decoding)
        now = self.wall_clock()
        prompts = sorted([seq for seq in self.running if not seq.is_decoding] + list(self.waiting),
                         key=lambda seq: (seq.num_output_tokens == 0 and seq.priority < now, *seq.sort_key()))
        for seq in decoding:
            if budget == 0:
                break
            if seq.status is SeqStatus.RUNNING and self._schedule_running(seq, 1, chunks):  # else preempted
                budget -= 1
        may_admit = True
        for seq in prompts:
            room = min(budget, prefill_budget)
            if room == 0:
                break
            if seq.status is SeqStatus.RUNNING:
                n = self._schedule_running(seq, room, chunks)
            elif may_admit and seq.status is SeqStatus.WAITING and len(self.running) < self.max_num_seqs:
                n = self._admit(seq, room, chunks)
                may_admit = n is not None
            else:
                continue
            budget -= n or 0
            prefill_budget -= n or 0
        return chunks

    def _prefill_budget(self, decoding: list[Sequence]) -> int:
        """Prompt tokens this step may take beside the sequences decoding in it (step_budget)."""
        if self.step_budget is None:
            return self.max_num_batched_tokens
        return self.step_budget.prefill_tokens(decoding, self.clock())

    def _schedule_running(self, seq: Sequence, room: int, chunks: list[ScheduledChunk]) -> int:
        """Schedules up to room tokens of a running sequence; how many (0: waiting for a media chunk, or seq had
        to be preempted to make room)."""
        n = min(seq.num_schedulable_tokens, room)
        if n == 0 or not self._make_room(seq, seq.num_computed_tokens + n):
            return 0
        self.block_manager.allocate(seq, seq.num_computed_tokens + n)
        chunks.append(ScheduledChunk(seq, n))
        return n

    def _admit(self, seq: Sequence, room: int, chunks: list[ScheduledChunk]) -> int | None:
        """Starts a waiting sequence with up to room tokens; how many, or None when the cache cannot take it (then
        no later one is admitted this step either: they would take the blocks it waits for)."""
        if seq.is_streamed and 0 in seq.pending_media and not self._has_room_to_wait(seq):
            return 0  # holds nothing until its first media chunk comes: the cache is needed by what can run
        if not seq.block_table:
            seq.num_cached_tokens = seq.num_computed_tokens = self.block_manager.allocate_cached_prefix(seq)
        n = min(seq.num_schedulable_tokens, room)
        # A streamed prompt takes the blocks of all of it at once: its later chunks must never wait for
        # blocks that other streamed prompts hold while they wait for theirs.
        num_tokens = max(seq.num_computed_tokens + n, seq.num_prompt_tokens if seq.is_streamed else 0)
        if not self.block_manager.can_allocate(seq, num_tokens):
            self.block_manager.free(seq)  # holding cached blocks while waiting could starve others
            seq.num_computed_tokens = 0
            return None
        self.block_manager.allocate(seq, num_tokens)
        self.waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        if n:  # else its cached prefix reaches a media chunk still missing
            chunks.append(ScheduledChunk(seq, n))
        return n

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
