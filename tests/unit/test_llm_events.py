"""A request's event stream: the deltas queued together leave as one message, in order, the rest as they were."""

from __future__ import annotations

import asyncio

import pytest

from services.llm.events import Delta, Finished, coalesced
from services.llm.sampler import TokenLogprobs

FINISHED = Finished("length", 5, 3, 0.0, 0.0, 0.0)


def queued(*events) -> asyncio.Queue:
    queue = asyncio.Queue()
    for event in events:
        queue.put_nowait(event)
    return queue


def lp(token_id: int) -> TokenLogprobs:
    return TokenLogprobs(token_id, -0.5, ())


async def test_queued_deltas_leave_as_one_then_the_final():
    out = [e async for e in coalesced(queued(Delta("a", [1], (lp(1),)), Delta("b", [2], (lp(2),)),
                                             Delta("c", [3], (lp(3),)), FINISHED))]
    assert out == [Delta("abc", [1, 2, 3], (lp(1), lp(2), lp(3))), FINISHED]


async def test_a_delta_is_not_held_for_the_next_one():
    queue = queued(Delta("a", [1]))
    stream = coalesced(queue)
    assert await anext(stream) == Delta("a", [1])  # nothing else queued: out at once
    queue.put_nowait(Delta("b", [2]))
    queue.put_nowait(FINISHED)
    assert [e async for e in stream] == [Delta("b", [2]), FINISHED]


async def test_an_error_after_deltas_is_raised_after_them():
    stream = coalesced(queued(Delta("a", [1]), Delta("b", [2]), RuntimeError("model step failed")))
    assert await anext(stream) == Delta("ab", [1, 2])
    with pytest.raises(RuntimeError, match="model step failed"):
        await anext(stream)
