"""What one request's stream carries: deltas, then one Finished; the deltas ready together leave as one."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from services.llm.sampler import TokenLogprobs


@dataclasses.dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token when the request asked for them

    def extended(self, following: Delta) -> Delta:
        """This delta and the one after it as one."""
        return Delta(self.text + following.text, self.token_ids + following.token_ids,
                     self.logprobs + following.logprobs)


@dataclasses.dataclass
class Finished:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    queue_ms: float
    prefill_ms: float
    ttft_ms: float
    decode_batch: float = 0.0  # mean sequences per step over the tokens after the first


async def coalesced(events: asyncio.Queue) -> AsyncIterator[Delta | Finished]:
    """A request's events up to its Finished (an exception in the queue is raised in its turn). The deltas already
    queued when one is taken leave with it as one message: a consumer that fell behind a few steps catches up in
    one message instead of one per token, and a token never waits for the next."""
    pending = None
    while True:
        event = pending if pending is not None else await events.get()
        pending = None
        while isinstance(event, Delta) and not events.empty():
            following = events.get_nowait()
            if not isinstance(following, Delta):
                pending = following
                break
            event = event.extended(following)
        if isinstance(event, Exception):
            raise event
        yield event
        if isinstance(event, Finished):
            return
