"""Bounded decode-ahead: decodes start only while fewer than the cap are untaken; a chunk is taken when its
segment or held tensor is gone, not when it was sent."""

from __future__ import annotations

import asyncio
import contextlib

import torch

from mmserve.transport import TensorStore, from_ref
from services.decoder import taken
from services.decoder.ahead import decode_ahead
from services.decoder.taken import TakenWatch


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_decodes_start_only_while_fewer_than_the_cap_are_untaken():
    async def main():
        started = []

        async def decode(item):
            started.append(item)
            return item * 10

        async with contextlib.aclosing(decode_ahead(list(range(6)), decode, 2)) as it:
            item, result, taken = await anext(it)
            await _settle()
            assert (item, result) == (0, 0) and started == [0, 1]
            item, _, taken_1 = await anext(it)  # yielded but not taken: still nothing more starts
            await _settle()
            assert item == 1 and started == [0, 1]
            taken()
            await _settle()
            assert started == [0, 1, 2]
            taken_1()
            rest = []
            async for item, result, taken in it:
                rest.append((item, result))
                taken()
        assert rest == [(2, 20), (3, 30), (4, 40), (5, 50)]

    asyncio.run(main())


def test_closing_cancels_the_decodes_still_running():
    async def main():
        gate, cancelled = asyncio.Event(), []

        async def decode(item):
            try:
                if item:
                    await gate.wait()
                return item
            except asyncio.CancelledError:
                cancelled.append(item)
                raise

        it = decode_ahead([0, 1, 2], decode, 3)
        assert (await anext(it))[0] == 0
        await _settle()
        await it.aclose()
        assert sorted(cancelled) == [1, 2]

    asyncio.run(main())


def _waiting(watch: TakenWatch, ref) -> asyncio.Task:
    return asyncio.ensure_future(watch.wait(ref))


def test_a_segment_is_taken_when_its_consumer_unlinks_it_not_when_sent(monkeypatch):
    monkeypatch.setattr(taken, "RECHECK_S", 3600.0)  # only the event may wake the waiter

    async def main():
        store = TensorStore("shm", inline_limit_bytes=1024)
        watch = TakenWatch(store)
        try:
            ref = store.to_ref(torch.ones(64, 1024, dtype=torch.uint8))
            assert ref.WhichOneof("location") == "shared_memory"
            waiting = _waiting(watch, ref)
            await _settle()
            assert not waiting.done()
            assert torch.equal(from_ref(ref), torch.ones(64, 1024, dtype=torch.uint8))  # maps and unlinks
            await asyncio.wait_for(waiting, 30)  # inotify woke it
            inline = store.to_ref(torch.ones(4, dtype=torch.uint8))
            await asyncio.wait_for(watch.wait(inline), 30)
        finally:
            watch.close()
            store.close()

    asyncio.run(main())


def test_a_held_tensor_is_taken_when_released(monkeypatch):
    monkeypatch.setattr(taken, "RECHECK_S", 3600.0)

    async def main():
        store = TensorStore("remote", inline_limit_bytes=1024)
        store.address = "127.0.0.1:1"
        watch = TakenWatch(store)
        try:
            ref = store.to_ref(torch.ones(64, 1024, dtype=torch.uint8))
            assert ref.WhichOneof("location") == "remote"
            waiting = _waiting(watch, ref)
            await _settle()
            assert not waiting.done()
            assert store.release([ref.remote.handle_id]) == 1
            await asyncio.wait_for(waiting, 30)
        finally:
            watch.close()
            store.close()

    asyncio.run(main())
