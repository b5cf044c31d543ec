"""A killed or paused Redis: requests are computed instead (same tokens as transformers), never an error;
the router's local LRU still answers what it has seen; the cache fills again once Redis is back."""

from __future__ import annotations

import os
import signal

import pytest

from stack.launcher import StackSpec, plan
from stack.ports import free_port
from mmserve.media.samples import make_image, make_video
from tests.conftest import RedisServer
from tests.integration.helpers import collect, image, request, router_stub, running, text, video
from tests.integration.reference import Reference

NUM_TOKENS = 8


@pytest.fixture(scope="module")
def redis_outage(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-outage"))
    server.start()
    yield server
    if server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


@pytest.fixture(scope="module")
def outage_router(tiny_model, redis_outage):
    """A stack of its own (tensors inline, to cover that transport too) so the shared stack's Redis stays up."""
    spec = StackSpec(model=str(tiny_model), port=free_port(), redis_url=redis_outage.url, log_level="ERROR",
                     transport="inline")
    planned = plan(spec)
    children, address = planned.children(), planned.router_address
    with running(children), router_stub(address) as stub:
        yield stub


@pytest.fixture(scope="module")
def reference(tiny_model):
    return Reference(tiny_model)


def ask(router, reference, media, question: str):
    req = request(media, text(question), num_tokens=NUM_TOKENS)
    result = collect(router, req)
    assert result.token_ids == reference.generate(req, NUM_TOKENS)
    return result.final


def test_killed_redis_computes_instead(outage_router, redis_outage, reference):
    seen = video(make_video(seconds=1.0, fps=30, width=112, height=84, seed=31))
    fresh = video(make_video(seconds=1.0, fps=30, width=112, height=84, seed=32))
    assert not ask(outage_router, reference, seen, "What is shown?").media_cached
    assert ask(outage_router, reference, seen, "Which colours?").media_cached  # from Redis, now local too

    redis_outage.stop()
    assert ask(outage_router, reference, seen, "Anything moving?").media_cached, "the router's LRU still has it"
    assert not ask(outage_router, reference, fresh, "What is shown?").media_cached
    assert not ask(outage_router, reference, fresh, "Again?").media_cached, "nothing could be written"

    redis_outage.start()  # back, empty, same port: the clients reconnect
    assert not ask(outage_router, reference, fresh, "And now?").media_cached
    assert ask(outage_router, reference, fresh, "Once more?").media_cached


def test_paused_redis_computes_instead(outage_router, redis_outage, reference):
    clip = video(make_video(seconds=1.0, fps=30, width=112, height=84, seed=33))
    picture = image(make_image(width=84, height=56, seed=34))
    os.kill(redis_outage.process.pid, signal.SIGSTOP)
    try:
        assert not ask(outage_router, reference, clip, "What is shown?").media_cached
        assert not ask(outage_router, reference, picture, "Describe it.").media_cached
    finally:
        os.kill(redis_outage.process.pid, signal.SIGCONT)
