"""`mmserve up --aggregated`: every stage in one process gives the greedy reference answers and stops cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys

import grpc
import psutil
import pytest

from mmserve import rpc
from stack.ports import free_port, port_is_free
from mmserve.media.samples import make_image, make_video
from mmserve.v1 import api_pb2_grpc
from tests.integration.helpers import collect, image, request, text, video
from tests.integration.reference import Reference

NUM_TOKENS = 32  # as test_parity; some lengths end inside a UTF-8 sequence, which the stream holds back
CASES = {
    "text": lambda: request(text("Write a short poem about the sea."), num_tokens=NUM_TOKENS),
    "image": lambda: request(image(make_image(width=120, height=90, seed=2)), text("Describe this image."),
                             num_tokens=NUM_TOKENS),
    "video": lambda: request(video(make_video(seconds=2.0, fps=30, width=112, height=84, seed=1)),
                             text("What happens in this video?"), num_tokens=NUM_TOKENS),
}


@pytest.fixture(scope="module")
def aggregated(tiny_model):
    """`mmserve up --aggregated` with its private redis-server; yields (process, router address)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "stack.cli", "up", "--aggregated", "--model", str(tiny_model),
                                "--port", str(port), "--log-level", "WARNING"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()  # blocks until every stage serves (or the process exits)
        assert f"router listening on 127.0.0.1:{port}" in line and "aggregated" in line, line
        yield process, f"127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def router(aggregated):
    channel = grpc.insecure_channel(aggregated[1], options=rpc.message_options(256 * 1024 * 1024))
    yield api_pb2_grpc.RouterStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def reference(tiny_model):
    return Reference(tiny_model)


def test_no_stage_runs_in_a_child_process(aggregated):
    process, _ = aggregated
    children = " ".join(" ".join(c.cmdline()) for c in psutil.Process(process.pid).children(recursive=True))
    assert "redis-server" in children  # the embedding cache stays in Redis
    for service in ("services.decoder", "services.encoder", "services.llm", "services.router"):
        assert service not in children.replace("services.decoder.worker", "")  # decode workers are a pool, not a stage


@pytest.mark.parametrize("case", list(CASES))
def test_aggregated_matches_transformers(router, reference, case):
    req = CASES[case]()
    result = collect(router, req)
    expected = reference.generate(req, NUM_TOKENS)
    assert len(expected) == NUM_TOKENS
    assert result.token_ids == expected
    assert result.final.finish_reason == "length"
    assert result.text == reference.tokenizer.decode(expected, skip_special_tokens=True)


def test_sigterm_stops_every_stage_and_frees_the_ports(aggregated, router):
    process, address = aggregated
    collect(router, CASES["text"]())  # a served request first: the stop must follow real work
    me = psutil.Process(process.pid)
    children = me.children(recursive=True)
    ports = {c.laddr.port for p in [me, *children] for c in p.net_connections(kind="inet")
             if c.status == psutil.CONN_LISTEN}
    assert int(address.rsplit(":", 1)[1]) in ports and len(ports) >= 5  # router, decoder, encoder, llm, redis
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"orphans left: {alive}"
    assert all(port_is_free("127.0.0.1", p) for p in ports)
