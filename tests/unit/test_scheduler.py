"""Scheduler and block manager: pure Python, milliseconds."""

from __future__ import annotations

import pytest

from services.llm.block_manager import BlockManager
from services.llm.scheduler import Scheduler
from services.llm.sequence import SamplingOptions, Sequence, SeqStatus


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=16) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, budget)


def make_seq(name: str, prompt_len: int, max_tokens: int = 8, priority: float = 0.0,
             first_token: int | None = None) -> Sequence:
    """A sequence whose prompt is distinct per name unless first_token is given."""
    first = sum(map(ord, name)) * 1000 if first_token is None else first_token
    return Sequence(name, list(range(first, first + prompt_len)), SamplingOptions(max_tokens=max_tokens),
                    priority=priority)


def step(scheduler: Scheduler, token: int = 7):
    """One engine step with a fake model that always samples `token`."""
    chunks = scheduler.schedule()
    new = {c.seq: token for c in chunks if c.completes_sequence}
    scheduler.postprocess(chunks, new)
    return {c.seq.seq_id: c.num_new_tokens for c in chunks}


def test_long_prompt_is_chunked_by_the_budget():
    s = make_scheduler(budget=16)
    seq = make_seq("a", 40)
    s.add(seq)
    assert step(s) == {"a": 16}
    assert step(s) == {"a": 16}
    assert seq.num_output_tokens == 0
    assert step(s) == {"a": 8}
    assert seq.num_output_tokens == 1
    assert step(s) == {"a": 1}


def test_decodes_are_scheduled_before_prefill_chunks():
    s = make_scheduler(budget=16)
    short = make_seq("short", 4)
    s.add(short)
    step(s)  # short's prompt done, one token out
    s.add(make_seq("long", 100))
    for _ in range(5):
        work = step(s)
        assert work["short"] == 1, "a decode must never stall behind a long prefill"
        assert work["long"] == 15


def test_blocks_follow_tokens_and_are_freed_on_finish():
    s = make_scheduler(num_blocks=16, block_size=4)
    seq = make_seq("a", 10)
    s.add(seq)
    step(s)
    assert len(seq.block_table) == 3  # 10 tokens in blocks of 4
    for _ in range(3):
        step(s)
    assert len(seq.block_table) == 4  # 13 tokens computed
    s.finish(seq, "stop")
    assert s.block_manager.num_free_blocks == 16
    assert seq.status is SeqStatus.FINISHED and not s.has_work


def test_out_of_blocks_preempts_lowest_priority_and_recomputes():
    s = make_scheduler(num_blocks=4, block_size=4, budget=64)
    urgent, lax = make_seq("urgent", 7, priority=0), make_seq("lax", 7, priority=1)
    s.add(urgent)
    s.add(lax)
    step(s)  # both prefilled: 2 blocks each, cache full
    step(s)  # each needs an 8th slot; still fits in the second block
    work = step(s)  # 9th token needs a third block: lax is preempted
    assert "urgent" in work and "lax" not in work
    assert lax.status is SeqStatus.WAITING and lax.num_computed_tokens == 0 and lax.num_preemptions == 1
    assert lax.num_output_tokens == 2, "generated tokens are kept and recomputed"
    s.finish(urgent, "stop")
    assert step(s) == {"lax": 9 - lax.num_cached_tokens}
    assert lax.num_computed_tokens == 9 and lax.num_output_tokens == 3


def test_waiting_sequences_admitted_by_priority_and_max_num_seqs():
    s = make_scheduler(max_num_seqs=2, budget=100)
    for name, priority in (("c", 3), ("a", 1), ("b", 2)):
        s.add(make_seq(name, 4, priority=priority))
    assert set(step(s)) == {"a", "b"}


def test_fits_rejects_requests_larger_than_the_cache():
    s = make_scheduler(num_blocks=4, block_size=4)
    assert s.fits(make_seq("ok", 8, max_tokens=8))
    assert not s.fits(make_seq("huge", 16, max_tokens=8))


def test_block_manager_allocate_and_free():
    bm = BlockManager(4, 2)
    seq = make_seq("a", 3)
    assert bm.can_allocate(seq, 8) and not bm.can_allocate(seq, 9)
    bm.allocate(seq, 3)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 2
    assert bm.slot(seq, 2) == seq.block_table[1] * 2
    with pytest.raises(MemoryError):
        bm.allocate(seq, 100)
    bm.free(seq)
    assert bm.num_free_blocks == 4 and seq.block_table == []


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"min_tokens": 9, "max_tokens": 8}, "min_tokens"), ({"stop": ("",)}, "stop"),
])
def test_sampling_options_reject_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingOptions(**kwargs)


def test_shared_prefix_is_computed_once():
    s = make_scheduler(num_blocks=32, block_size=4, budget=64)
    first = make_seq("first", 10, first_token=0)
    s.add(first)
    step(s)
    second = make_seq("second", 10, first_token=0)  # same 10-token prompt
    s.add(second)
    work = step(s)
    assert second.num_cached_tokens == 8, "two full blocks are shared"
    assert work["second"] == 2
    assert second.block_table[:2] == first.block_table[:2]
    assert s.block_manager.ref_counts[first.block_table[0]] == 2
    s.finish(first, "stop")
    s.finish(second, "stop")
    assert s.block_manager.num_free_blocks == 32


def test_without_prefix_caching_every_prompt_is_computed_whole():
    s = Scheduler(BlockManager(32, 4, prefix_caching=False), max_num_seqs=8, max_num_batched_tokens=64)
    first, second = make_seq("first", 10, first_token=0), make_seq("second", 10, first_token=0)
    s.add(first)
    step(s)
    s.add(second)
    assert step(s)["second"] == 10 and second.num_cached_tokens == 0
    assert not set(second.block_table) & set(first.block_table)


def test_freed_blocks_stay_reusable_until_handed_out_again():
    s = make_scheduler(num_blocks=8, block_size=4, budget=64)
    a = make_seq("a", 9, first_token=0)
    s.add(a)
    step(s)
    s.finish(a, "stop")
    again = make_seq("again", 9, first_token=0)
    s.add(again)
    step(s)
    assert again.num_cached_tokens == 8


def test_same_tokens_with_other_media_do_not_share():
    s = make_scheduler(num_blocks=32, block_size=4, budget=64)
    a, b = make_seq("a", 10, first_token=0), make_seq("b", 10, first_token=0)
    a.media_spans = [(2, 6, "video-one")]
    b.media_spans = [(2, 6, "video-two")]
    s.add(a)
    step(s)
    s.add(b)
    step(s)
    assert b.num_cached_tokens == 0, "placeholder tokens are equal but the embeddings differ"


def test_a_reused_free_block_is_never_handed_out_twice():
    s = make_scheduler(num_blocks=6, block_size=4, budget=64)
    a = make_seq("a", 9, first_token=0)
    s.add(a)
    step(s)
    s.finish(a, "stop")  # its blocks go back to the free list with their hashes
    again = make_seq("again", 9, first_token=0)
    s.add(again)
    step(s)  # reuses two cached blocks out of the middle of the free list
    other = make_seq("other", 12)
    s.add(other)
    step(s)
    held = again.block_table + other.block_table
    assert len(held) == len(set(held)), "no block may belong to two sequences"
    assert s.block_manager.num_free_blocks == 6 - len(held)


def test_a_sequence_waiting_for_media_keeps_its_blocks_and_takes_no_share_of_a_step():
    s = make_scheduler(num_blocks=12, block_size=4, budget=16)
    streamed = make_seq("streamed", 20)
    streamed.is_streamed, streamed.pending_media = True, {0: (6, 10), 1: (10, 14)}
    s.add(streamed)
    assert step(s) == {"streamed": 6}, "the text before the first missing chunk"
    assert len(streamed.block_table) == 5, "the whole prompt's blocks, taken at admission"
    other = make_seq("other", 8)
    s.add(other)
    assert step(s) == {"other": 8} and step(s) == {"other": 1}, "the waiting one takes no share of a step"
    del streamed.pending_media[1]  # out of order: still waits for chunk 0
    assert streamed.num_schedulable_tokens == 0 and streamed.is_waiting_for_media
    del streamed.pending_media[0]
    assert step(s) == {"other": 1, "streamed": 14}
    s.preempt(streamed)  # its prefilled media are gone: dropped, never queued for recomputation
    assert s.dropped == [streamed] and streamed.is_finished and streamed not in s.waiting


def test_a_streamed_prompt_takes_no_blocks_before_its_first_chunk_while_the_cache_is_busy():
    s = make_scheduler(num_blocks=16, block_size=4, budget=32)
    running = make_seq("running", 24, max_tokens=20)  # 7 of the 16 blocks with its first token
    s.add(running)
    step(s)
    streamed = make_seq("streamed", 20)
    streamed.is_streamed, streamed.pending_media = True, {0: (6, 10), 1: (10, 14)}
    s.add(streamed)
    assert step(s) == {"running": 1} and streamed.block_table == [] and streamed in s.waiting
    text = make_seq("text", 8)  # one that can run goes ahead of it
    s.add(text)
    assert step(s) == {"running": 1, "text": 8}
    del streamed.pending_media[0]  # its first chunk came: it takes the whole prompt's blocks, computes up to chunk 1
    assert step(s) == {"running": 1, "text": 1, "streamed": 10} and len(streamed.block_table) == 5
