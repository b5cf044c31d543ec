"""The step budget: a step's prompt chunks held to what fits beside the decodes within a share of the tightest
time-per-token target (pure Python, milliseconds), and the router handing the llm that target."""

from __future__ import annotations

import random
import types

import pytest

from mmserve.v1 import api_pb2
from services.llm.block_manager import BlockManager
from services.llm.scheduler import Scheduler
from services.llm.sequence import SamplingOptions, Sequence
from services.llm.step_budget import StepBudget
from services.router.policy import Slo
from services.router.server import RouterServicer


def known_budget(share: float = 0.75, min_tokens: int = 4) -> StepBudget:
    """A budget whose time model is its seed: 5 ms a step, 1 ms per decoding sequence, 0.5 ms per prompt token."""
    return StepBudget(512, share=share, min_tokens=min_tokens, seed=(5.0, 1.0, 0.5))


def make_seq(name: str, prompt_len: int, tpot_ms: float = 0.0, priority: float = 0.0) -> Sequence:
    first = sum(map(ord, name)) * 1000
    return Sequence(name, list(range(first, first + prompt_len)), SamplingOptions(max_tokens=64), priority=priority,
                    tpot_ms=tpot_ms)


def decoding(tpot_ms: float, num_output_tokens: int = 1, first_token_at: float = 100.0) -> Sequence:
    """A sequence past its prompt with num_output_tokens out, the first at first_token_at."""
    seq = make_seq("d", 4, tpot_ms)
    seq.token_ids += [7] * num_output_tokens
    seq.num_computed_tokens, seq.first_token_at = seq.num_tokens - 1, first_token_at
    return seq


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_scheduler(budget: StepBudget, max_num_batched_tokens: int = 512) -> tuple[Scheduler, Clock]:
    """A scheduler on a test clock, which is also the clock of the priorities (deadlines)."""
    clock = Clock()
    return Scheduler(BlockManager(256, 4), 8, max_num_batched_tokens, budget, clock, clock), clock


def beside_a_decode(due_in_s: float | None = None) -> tuple[Scheduler, Clock, Sequence]:
    """A scheduler on the known budget with one short sequence decoding at a 40 ms target (its prompt done in one
    step); its priority a deadline due_in_s after now, or 0.0."""
    scheduler, clock = make_scheduler(known_budget())
    short = make_seq("short", 4, tpot_ms=40.0, priority=0.0 if due_in_s is None else clock.now + due_in_s)
    scheduler.add(short)
    step(scheduler, clock)  # short's prompt done: it decodes from now on
    return scheduler, clock, short


def step(scheduler: Scheduler, clock: Clock, ms: float = 30.0) -> dict[str, int]:
    """One engine step of ms with a fake model that always samples token 7."""
    chunks = scheduler.schedule()
    clock.now += ms / 1e3
    scheduler.postprocess(chunks, {c.seq: 7 for c in chunks if c.completes_sequence})
    return {c.seq.seq_id: c.num_new_tokens for c in chunks}


def test_the_time_model_learns_the_steps_and_sizes_the_prompt_share_from_it():
    budget = StepBudget(2048, share=0.75, min_tokens=8)
    rng = random.Random(0)
    for _ in range(400):  # the device: 8 ms a step, 0.5 ms per decoding sequence, 0.4 ms per prompt token
        num_decoding, num_prefill = rng.randint(1, 32), rng.choice([0, 0, 16, 64, 256, 900])
        budget.observe(num_decoding, num_prefill, 8 + 0.5 * num_decoding + 0.4 * num_prefill)
    assert budget.predict_ms(10, 100) == pytest.approx(8 + 5 + 40, rel=0.02)
    # The next tokens are due 0.75 × 53 ms after the first: less the decodes' 13 ms, 26.75 ms, 66 tokens at 0.4 ms.
    assert budget.prefill_tokens([decoding(53.0) for _ in range(10)], now=100.0) in (65, 66, 67)


def test_without_a_target_the_token_budget_holds_and_a_tight_one_still_lets_prompts_advance():
    budget = known_budget(min_tokens=4)
    assert budget.prefill_tokens([decoding(0.0) for _ in range(10)], now=100.0) == 512  # nobody has a target
    assert known_budget(share=0.0).prefill_tokens([decoding(40.0)], now=100.0) == 512  # shaping turned off
    assert budget.prefill_tokens([decoding(40.0) for _ in range(10)], now=100.0) == int((30 - 15) / 0.5)
    assert budget.prefill_tokens([decoding(40.0) for _ in range(30)], now=100.0) == 4, \
        "the decodes alone exceed the time left: the minimum, never zero"


def test_a_sequence_ahead_of_its_schedule_leaves_room_and_one_behind_it_leaves_the_minimum():
    budget = known_budget(min_tokens=4)
    # 5 tokens out, the first 50 ms ago: the 6th is due 0.75 × 40 × 5 = 150 ms after it, 100 ms from now.
    assert budget.prefill_tokens([decoding(40.0, 5, first_token_at=99.95)], now=100.0) == int((100 - 6) / 0.5)
    assert budget.prefill_tokens([decoding(40.0, 5, first_token_at=99.8)], now=100.0) == 4  # 200 ms: behind
    # The earliest due time decides: one behind beside one far ahead.
    assert budget.prefill_tokens([decoding(40.0, 5, first_token_at=99.8), decoding(40.0, 5, first_token_at=99.95)],
                                 now=100.0) == 4


def test_a_sequence_far_ahead_of_its_schedule_lends_one_step_at_most_max_ahead_tokens_of_its_time():
    budget = known_budget(min_tokens=4)  # max_ahead_tokens 4: 4 × 0.75 × 40 = 120 ms at most
    # 200 tokens out in 2 s against a 6 s schedule: 4 s banked, but one step gets 120 ms of it.
    assert budget.prefill_tokens([decoding(40.0, 200, first_token_at=98.0)], now=100.0) == int((120 - 6) / 0.5)
    lender = StepBudget(512, min_tokens=4, max_ahead_tokens=8, seed=(5.0, 1.0, 0.5))
    assert lender.prefill_tokens([decoding(40.0, 200, first_token_at=98.0)], now=100.0) == int((240 - 6) / 0.5)


def test_a_long_prompt_is_chunked_to_the_time_left_beside_a_decoding_sequence_with_a_target():
    scheduler, clock, _ = beside_a_decode()
    scheduler.add(make_seq("long", 200))
    for _ in range(3):  # each step takes the 30 ms it is allowed: short stays on schedule, no room is banked
        work = step(scheduler, clock, ms=30.0)
        assert work["short"] == 1, "the decode runs every step"
        # 48 tokens fit in 30 ms beside one decode (one less where the clock's float sums round down)
        assert work["long"] == pytest.approx(int((0.75 * 40 - (5 + 1)) / 0.5), abs=1)


def test_steps_shorter_than_the_target_bank_room_for_a_longer_chunk_later():
    scheduler, clock, _ = beside_a_decode()
    for _ in range(4):  # 10 ms steps against a 30 ms schedule: 20 ms banked each
        step(scheduler, clock, ms=10.0)
    scheduler.add(make_seq("long", 400))
    assert step(scheduler, clock)["long"] == pytest.approx(int((0.75 * 40 * 5 - 40 - 6) / 0.5), abs=1)  # 208


def test_the_tightest_target_among_the_decoding_sequences_sizes_the_step():
    scheduler, clock = make_scheduler(known_budget())
    for name, tpot_ms in (("loose", 200.0), ("tight", 40.0), ("none", 0.0)):
        scheduler.add(make_seq(name, 4, tpot_ms=tpot_ms))
    step(scheduler, clock)
    scheduler.add(make_seq("long", 200))
    assert step(scheduler, clock)["long"] == int((0.75 * 40 - (5 + 3)) / 0.5)  # 44


def test_prompts_take_the_whole_token_budget_when_no_decoding_sequence_has_a_target():
    scheduler, clock = make_scheduler(known_budget(), max_num_batched_tokens=128)
    scheduler.add(make_seq("short", 4))
    step(scheduler, clock)
    scheduler.add(make_seq("long", 400))
    assert step(scheduler, clock) == {"short": 1, "long": 127}


def test_a_waiting_prompt_shares_the_prefill_budget_with_a_running_one_in_priority_order():
    scheduler, clock, short = beside_a_decode()
    scheduler.add(make_seq("first", 200, priority=1.0))
    done = step(scheduler, clock)["first"]  # the 48 tokens of prefill room
    scheduler.add(make_seq("second", 30, priority=2.0))
    work = step(scheduler, clock)
    assert work["first"] == pytest.approx(48, abs=1) and "second" not in work, "the earlier deadline takes it first"
    done += work["first"]
    scheduler.finish(short, "stop")
    # nobody decodes with a target: the token budget alone
    assert step(scheduler, clock) == {"first": 200 - done, "second": 30}


def test_a_prompt_due_sooner_goes_ahead_of_the_next_chunk_of_one_already_prefilling():
    scheduler, clock, _ = beside_a_decode()
    scheduler.add(make_seq("video", 400, priority=5.0))
    assert step(scheduler, clock)["video"] == pytest.approx(48, abs=1)  # running now, its prompt chunked
    scheduler.add(make_seq("text", 30, priority=1.0))  # came during it, due sooner
    work = step(scheduler, clock)
    assert work["text"] == 30, "a text must not wait for every chunk of a long prompt due later"
    assert work["video"] == pytest.approx(48 - 30, abs=1), "the rest of the room goes on with the video"


def test_a_prompt_past_its_deadline_goes_after_one_that_can_still_make_its_own():
    scheduler, clock, _ = beside_a_decode(due_in_s=0.05)
    scheduler.add(make_seq("overdue", 400, priority=clock.now - 0.5))  # its first token was due 0.5 s ago
    assert step(scheduler, clock)["overdue"] == pytest.approx(48, abs=1)
    scheduler.add(make_seq("text", 30, priority=clock.now + 0.1))
    scheduler.add(make_seq("later", 30, priority=clock.now + 0.2))
    work = step(scheduler, clock)
    assert work["text"] == 30 and work["later"] == pytest.approx(48 - 30, abs=1) and "overdue" not in work
    assert step(scheduler, clock)["overdue"] > 0, "it goes on once the others are served"


def test_a_sequence_decodes_once_its_prompt_is_done_not_while_its_last_prompt_token_waits():
    scheduler, clock = make_scheduler(known_budget(), max_num_batched_tokens=4)
    seq = make_seq("a", 5)
    scheduler.add(seq)
    step(scheduler, clock)  # 4 of 5 prompt tokens: one left, still a prompt chunk
    assert seq.num_uncomputed_tokens == 1 and not seq.is_decoding and not seq.first_token_at
    step(scheduler, clock)
    assert seq.is_decoding and seq.first_token_at == clock.now


@pytest.mark.parametrize("policy, expected", [("slo", 53.0), ("fcfs", 0.0)])
def test_the_router_hands_the_llm_the_requests_time_per_token_target_under_the_slo_policy(policy, expected):
    router = types.SimpleNamespace(config=types.SimpleNamespace(policy=policy))
    ticket = types.SimpleNamespace(slo=Slo(ttft_ms=895.0, tpot_ms=53.0))
    tpot_ms = RouterServicer._tpot_ms(router, ticket)
    assert tpot_ms == expected
    request = api_pb2.GenerateRequest(messages=[api_pb2.Message(role="user", parts=[api_pb2.Part(text="hi")])])
    assert RouterServicer._llm_request(request, "r", [], 1.0, tpot_ms).tpot_ms == expected
