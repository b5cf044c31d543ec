"""`mmserve up` under kill -9 of each part during traffic: the part is restarted, the stack serves again, requests
that did not touch it complete, requests inside it end UNAVAILABLE naming it, and a dead Redis is a cache miss."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import psutil
import pytest

from mmserve.media.samples import make_image
from stack.ports import free_port
from tests.conftest import RELAXED_SLOS
from tests.integration import helpers
from tests.integration.helpers import collect, image, metric, router_stub, text

pytestmark = pytest.mark.slow

SERVE_AGAIN_S = 60  # a generous wait limit, not a speed target
LONG = 300  # tokens: a text stream still running when its part is killed


def request(*parts, num_tokens: int):
    """A greedy request (the stack's SLOs are loose enough that admission never refuses it on a slow machine)."""
    return helpers.request(*parts, num_tokens=num_tokens)


@dataclasses.dataclass
class Up:
    process: subprocess.Popen
    router: object
    metrics_port: int
    log: pathlib.Path

    def log_tail(self) -> str:
        """The stack's last log lines, for a failure's message."""
        return "\n".join(self.log.read_text().splitlines()[-40:])

    def child(self, name: str) -> psutil.Process:
        """The running child whose command line names this service (or redis-server)."""
        marker = "redis-server" if name == "redis" else f"services.{name}"
        found = [p for p in psutil.Process(self.process.pid).children() if marker in " ".join(p.cmdline())]
        assert len(found) == 1, found
        return found[0]


@pytest.fixture(scope="module")
def up(tiny_model, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("up") / "stderr.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "stack.cli", "up", "--model", str(tiny_model), "--port",
                                    str(port), "--metrics", "--log-level", "WARNING",
                                    "--router-flags", " ".join(RELAXED_SLOS)],
                                   stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        line = process.stdout.readline()  # blocks until healthy (or the launcher exits)
        assert f"router listening on 127.0.0.1:{port}" in line, log.read_text()[-3000:]
        metrics_port = int(re.search(r"launcher metrics on http://127.0.0.1:(\d+)/", log.read_text()).group(1))
        with router_stub(f"127.0.0.1:{port}") as router:
            yield Up(process, router, metrics_port, log)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]


@dataclasses.dataclass
class Outcome:
    code: str  # "OK" or the status name
    details: str
    num_tokens: int


def _stream(router, req, streaming: threading.Event) -> Outcome:
    """One request to its end; streaming is set at its first delta (or its end)."""
    num_tokens = 0
    try:
        for reply in router.Generate(req, timeout=120):
            if reply.WhichOneof("event") == "delta":
                num_tokens += len(reply.delta.token_ids)
                streaming.set()
        return Outcome("OK", "", num_tokens)
    except grpc.RpcError as err:
        return Outcome(err.code().name, err.details() or "", num_tokens)
    finally:
        streaming.set()


def _kill_during_traffic(up: Up, victim: str, seed: int) -> tuple[list[Outcome], list[Outcome]]:
    """Kills victim with SIGKILL while text streams run and image requests arrive; the outcomes of both."""
    dead = up.child(victim)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        started = [threading.Event() for _ in range(3)]
        texts = [pool.submit(_stream, up.router, request(text(f"tell a long story {seed}.{i}"), num_tokens=LONG), e)
                 for i, e in enumerate(started)]
        for e in started:
            assert e.wait(60)
        images = [pool.submit(_stream, up.router, request(image(make_image(width=56, height=56, seed=seed * 10 + i)),
                                                          text("what is it?"), num_tokens=16), threading.Event())
                  for i in range(4)]
        dead.send_signal(signal.SIGKILL)
        texts += [pool.submit(_stream, up.router, request(text(f"meanwhile {seed}.{i}"), num_tokens=16),
                              threading.Event()) for i in range(2)]
        outcomes = [f.result(timeout=180) for f in texts], [f.result(timeout=180) for f in images]
    dead.wait(10)
    return outcomes


def _serves_again(up: Up, victim: str, seed: int) -> None:
    """Within SERVE_AGAIN_S an image request (every stage) completes; the victim was restarted exactly once."""
    deadline = time.monotonic() + SERVE_AGAIN_S
    while True:
        try:
            result = collect(up.router, request(image(make_image(width=56, height=56, seed=seed)), text("again?"),
                                                num_tokens=8), timeout=SERVE_AGAIN_S)
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err  # only while the part restarts
            assert time.monotonic() < deadline, f"not serving {SERVE_AGAIN_S} s after {victim} was killed: {err}"
            time.sleep(0.5)  # a client's pause before it retries
    assert result.final.completion_tokens == 8
    assert metric(up.metrics_port, "mmserve_child_restarts_total", child=victim) == 1
    assert up.child(victim).is_running()


def _assert_failed_naming(outcomes: list[Outcome], stage: str) -> None:
    for o in outcomes:
        assert o.code == "OK" or (o.code == "UNAVAILABLE" and stage in o.details), o


@pytest.mark.parametrize("victim", ["encoder", "decoder"])
def test_a_killed_media_stage_is_restarted_and_text_requests_never_notice(up, victim):
    seed = 100 + len(victim)
    texts, images = _kill_during_traffic(up, victim, seed)
    assert [o.code for o in texts] == ["OK"] * len(texts), texts  # they never touched it
    assert all(o.num_tokens in (LONG, 16) for o in texts)
    _assert_failed_naming(images, victim)
    _serves_again(up, victim, seed)


def test_a_killed_redis_is_a_cache_miss_then_a_cache_again(up):
    texts, images = _kill_during_traffic(up, "redis", seed=300)
    assert [o.code for o in texts + images] == ["OK"] * (len(texts) + len(images)), (texts + images, up.log_tail())
    _serves_again(up, "redis", seed=301)
    fresh = request(image(make_image(width=56, height=56, seed=302)), text("cached?"), num_tokens=4)
    assert not collect(up.router, fresh).final.media_cached
    assert collect(up.router, fresh).final.media_cached  # the restarted Redis holds it


def test_a_killed_llm_fails_its_streams_saying_how_much_was_delivered(up):
    texts, images = _kill_during_traffic(up, "llm", seed=400)
    streamed = texts[:3]  # those that had tokens when it died
    assert all(o.code == "UNAVAILABLE" for o in streamed), streamed
    for o in streamed:
        assert re.fullmatch(r"llm: replica lost after (\d+) tokens were delivered; not safe to retry blindly",
                            o.details), o
        assert int(re.search(r"\d+", o.details).group()) == o.num_tokens > 0
    _assert_failed_naming(texts[3:] + images, "llm")
    _serves_again(up, "llm", seed=401)


def test_a_killed_router_is_restarted_and_clients_reconnect(up):
    texts, images = _kill_during_traffic(up, "router", seed=500)
    assert all(o.code in ("OK", "UNAVAILABLE") for o in texts + images), texts + images
    _serves_again(up, "router", seed=501)
