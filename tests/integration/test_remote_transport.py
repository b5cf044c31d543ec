"""Remote pulls and embeddings by cache key on real processes: a stack forced to --transport remote answers like
transformers; an llm whose cache lost an entry says NOT_FOUND and the router computes the media again; a remote
ref to a killed producer is UNAVAILABLE naming it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import grpc
import pytest
import torch

from mmserve import rpc, transport
from mmserve.cache import CachedEmbedding, EmbeddingCache
from stack.launcher import StackSpec, plan
from stack.ports import free_port
from mmserve.media.samples import make_image, make_video
from mmserve.v1 import api_pb2, decoder_pb2, llm_pb2, llm_pb2_grpc
from tests.integration.helpers import collect, image, metric, request, router_stub, running, text, video
from tests.integration.reference import Reference
from tests.integration.test_transport_leaks import Producer

NUM_TOKENS = 16


@pytest.fixture(scope="module")
def reference(tiny_model):
    return Reference(tiny_model)


@pytest.fixture(scope="module")
def remote_stack(tiny_model, redis_server):
    """Every tensor handed between stages is pulled from its producer; the llm is given no embedding cache,
    so every cache hit the router finds is a miss for the llm (the eviction path, every time)."""
    # Store-and-forward: streamed, the router reads cache hits itself and the llm reads no keys at all.
    spec = StackSpec(model=str(tiny_model), port=free_port(), redis_url=redis_server.url, log_level="WARNING",
                     transport="remote", metrics=True, router_args=("--no-stream-prefill",))
    planned = plan(spec)
    children, address = planned.children(), planned.router_address
    llm = next(c for c in children if c.name == "llm")
    llm.argv += ["--redis-url", ""]  # argparse: the last occurrence wins
    with running(children), router_stub(address) as stub:
        yield stub, {c.name: c.metrics_port for c in children if c.metrics_port}


def ask(router, reference, *parts):
    req = request(*parts, num_tokens=NUM_TOKENS)
    result = collect(router, req)
    assert result.token_ids == reference.generate(req, NUM_TOKENS)
    return result.final


def test_remote_stack_matches_transformers_and_recomputes_what_the_llm_cannot_read(remote_stack, reference):
    router, metrics_ports = remote_stack
    clip = video(make_video(seconds=2.0, fps=30, width=112, height=84, seed=41))
    picture = image(make_image(width=120, height=90, seed=42))
    assert not ask(router, reference, clip, text("What happens?")).media_cached
    assert not ask(router, reference, picture, text("Describe it.")).media_cached
    # The router finds the entries the encoder wrote and sends the llm keys; the llm answers NOT_FOUND, so the
    # media is decoded and encoded again, and the answer is still exact.
    again = ask(router, reference, clip, text("What happens next?"))
    assert not again.media_cached and again.timings.encode_ms > 0
    assert ask(router, reference, text("Plain text.")).num_media == 0
    for producer in ("decoder", "encoder"):  # frames and embeddings really were pulled
        assert refs_handed(metrics_ports[producer], "remote") > 0, producer
        assert refs_handed(metrics_ports[producer], "shared_memory") == 0, producer


def refs_handed(metrics_port: int, location: str) -> float:
    return metric(metrics_port, "mmserve_tensor_refs_total", transport=location)


def llm_stub(address: str):
    channel = grpc.insecure_channel(address, options=rpc.message_options(256 * 1024 * 1024))
    return llm_pb2_grpc.LlmStub(channel), channel


def llm_request(embedding: llm_pb2.MediaEmbedding) -> llm_pb2.LlmRequest:
    return llm_pb2.LlmRequest(request_id="direct", messages=[llm_pb2.LlmMessage(role="user", parts=[
        llm_pb2.LlmPart(media=embedding), llm_pb2.LlmPart(text="Describe it.")])],
        sampling=api_pb2.SamplingParams(max_tokens=4, min_tokens=4, temperature=0.0))


def generate(stub, req) -> list[int]:
    return [t for reply in stub.Generate(req, timeout=120) if reply.WhichOneof("event") == "delta"
            for t in reply.delta.token_ids]


@pytest.fixture(scope="module")
def cached_llm(tiny_model, redis_server):
    """A lone llm process that reads the embedding cache."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "services.llm", "--model", str(tiny_model), "--port", str(port),
                                "--redis-url", redis_server.url, "--log-level", "WARNING"])
    try:
        asyncio.run(rpc.wait_healthy(f"127.0.0.1:{port}", 180))
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def image_embedding(tiny_model, seed: int) -> torch.Tensor:
    hidden = json.loads((tiny_model / "config.json").read_text())["text_config"]["hidden_size"]
    return torch.randn(4, hidden, generator=torch.Generator().manual_seed(seed))  # grid (1, 4, 4), merge 2


def test_llm_reads_embeddings_by_cache_key_and_says_not_found_when_evicted(cached_llm, tiny_model, redis_server):
    rows = image_embedding(tiny_model, 0)
    key = f"test:remote-transport:{free_port()}"
    cache = EmbeddingCache(redis_server.url, timeout_s=5.0)
    assert asyncio.run(cache.put(key, CachedEmbedding(transport.to_inline(rows), (1, 4, 4), 0.0)))
    stub, channel = llm_stub(cached_llm)
    try:
        by_key = generate(stub, llm_request(llm_pb2.MediaEmbedding(
            kind=decoder_pb2.MEDIA_KIND_IMAGE, grid_thw=[1, 4, 4], cache_keys=[key])))
        by_bytes = generate(stub, llm_request(llm_pb2.MediaEmbedding(
            kind=decoder_pb2.MEDIA_KIND_IMAGE, grid_thw=[1, 4, 4], embeddings=transport.to_inline(rows))))
        assert len(by_key) == 4 and by_key == by_bytes
        with pytest.raises(grpc.RpcError) as err:
            generate(stub, llm_request(llm_pb2.MediaEmbedding(
                kind=decoder_pb2.MEDIA_KIND_IMAGE, grid_thw=[1, 4, 4], cache_keys=[key + ":evicted"])))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "evicted" in err.value.details()
    finally:
        channel.close()


def test_remote_embeddings_of_a_killed_producer_are_unavailable_naming_it(cached_llm, tiny_model):
    producer = Producer(policy="remote")
    stub, channel = llm_stub(cached_llm)
    try:
        ref = producer.produce(4 * 64 * 4)
        assert ref.WhichOneof("location") == "remote"
        producer.process.kill()  # before the llm pulls
        producer.process.wait()
        with pytest.raises(grpc.RpcError) as err:
            generate(stub, llm_request(llm_pb2.MediaEmbedding(
                kind=decoder_pb2.MEDIA_KIND_IMAGE, grid_thw=[1, 4, 4], embeddings=ref)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"producer {producer.address} unavailable" in err.value.details()
        # ...and says the input is to blame, so the router computes it again instead of withdrawing this llm.
        assert (rpc.INPUT_GONE_HEADER, "1") in tuple(err.value.trailing_metadata())
    finally:
        channel.close()
        producer.stop()
