"""Bounded decode-ahead: a request's chunks decode in order, at most a cap of them started and not yet taken."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from prometheus_client import Counter, Gauge

CHUNKS_DECODED = Counter("mmserve_decoder_chunks_decoded_total", "Video chunks decoded (yielded or not yet)")
HELD_BACK = Gauge("mmserve_decoder_requests_held_back",
                  "Requests that have decoded max_chunks_ahead chunks their consumer has not taken, and wait")

Item = TypeVar("Item")
Result = TypeVar("Result")


async def decode_ahead(items: Sequence[Item], decode_one: Callable[[Item], Awaitable[Result]],
                       max_ahead: int) -> AsyncIterator[tuple[Item, Result, Callable[[], None]]]:
    """(item, decode_one(item), taken) for each item in order. An item's decode starts only while fewer than
    max_ahead started items are not yet taken; the consumer calls taken() once it has the item's result, which
    lets the next one start. Closing the iterator cancels the decodes still running."""
    slots = asyncio.BoundedSemaphore(max_ahead)
    started: asyncio.Queue[asyncio.Future] = asyncio.Queue()
    futures: set[asyncio.Future] = set()  # started and not yet yielded: a yielded result is the consumer's

    async def decode(item: Item) -> Result:
        result = await decode_one(item)
        CHUNKS_DECODED.inc()
        return result

    async def launch() -> None:
        for item in items:
            if slots.locked():
                HELD_BACK.inc()
                try:
                    await slots.acquire()
                finally:
                    HELD_BACK.dec()
            else:
                await slots.acquire()
            future = asyncio.ensure_future(decode(item))
            futures.add(future)
            started.put_nowait(future)

    launcher = asyncio.ensure_future(launch())
    try:
        for item in items:
            future = await started.get()
            result = await future
            futures.discard(future)
            yield item, result, slots.release
            del result
    finally:
        launcher.cancel()
        for future in futures:
            future.cancel()
        await asyncio.gather(launcher, *futures, return_exceptions=True)
