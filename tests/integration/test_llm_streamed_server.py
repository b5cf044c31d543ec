"""GenerateStreamed on a real llm process: chunks as shared-memory TensorRefs out of order answer like Generate with
the whole tensor; a malformed chunk (or time-per-token target) is INVALID_ARGUMENT naming the field; a client that
goes away mid-stream leaves no block and no segment behind, and a request that needs the whole KV cache is served
after it."""

from __future__ import annotations

import asyncio
import sys

import grpc
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from mmserve import rpc, transport
from mmserve.models.family import family_of, pack
from mmserve.transport import shm
from mmserve.v1 import api_pb2, decoder_pb2, llm_pb2, llm_pb2_grpc
from services.llm.config import LlmConfig
from stack.launcher import Child
from stack.ports import free_port
from tests.integration.helpers import metric, running

NUM_TOKENS = 8
ROWS = 6  # rows of one temporal group of the clip below
BLOCK_SIZE = 4
NUM_BLOCKS = 64
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads of 16, float32: the tiny checkpoint


@pytest.fixture(scope="module")
def llm(tiny_model):
    """A lone llm process with a KV cache of NUM_BLOCKS blocks; yields (address, metrics port)."""
    port, metrics_port = free_port(), free_port()
    config = LlmConfig(model=str(tiny_model), port=port, metrics_port=metrics_port, log_level="WARNING",
                       block_size=BLOCK_SIZE, kv_cache_bytes=NUM_BLOCKS * BLOCK_SIZE * KV_BYTES_PER_TOKEN)
    with running([Child("llm", [sys.executable, "-m", "services.llm", *config.to_argv()], f"127.0.0.1:{port}",
                        metrics_port)]):
        yield f"127.0.0.1:{port}", metrics_port


@pytest.fixture(scope="module")
def packed_video(tiny_model) -> tuple[torch.Tensor, tuple[int, int, int], float]:
    """A random clip of 7 temporal groups as the encoder sends it: packed embeddings, grid, seconds per group."""
    family = family_of(tiny_model)
    rng = np.random.default_rng(0)
    frames = np.clip(rng.integers(0, 256, (14, 1, 1, 3)) + rng.integers(-20, 21, (14, 56, 84, 3)), 0, 255)
    pixels, item = family.preprocess_video(torch.from_numpy(frames.astype(np.uint8)), list(range(14)), 2.0)
    encoded = family.encode(family.load_vision_tower(str(tiny_model)), pixels, [item])[0]
    assert encoded.embeddings.shape[0] == 7 * ROWS
    return pack(encoded), tuple(item.grid), item.second_per_grid_t


@pytest.fixture
def store():
    """The test's own producer store: every tensor to shared memory, as an encoder on this host hands it over."""
    store = transport.TensorStore("shm", inline_limit_bytes=1)
    yield store
    store.close()


def llm_request(media: llm_pb2.MediaEmbedding, question: str = "What happens?",
                request_id: str = "streamed") -> llm_pb2.LlmRequest:
    return llm_pb2.LlmRequest(request_id=request_id, messages=[llm_pb2.LlmMessage(role="user", parts=[
        llm_pb2.LlmPart(text="Watch this:"), llm_pb2.LlmPart(media=media), llm_pb2.LlmPart(text=question)])],
        sampling=api_pb2.SamplingParams(max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS, temperature=0.0))


def planned(grid, second_per_grid_t: float, chunk_rows: list[int], digest: str = "") -> llm_pb2.MediaEmbedding:
    return llm_pb2.MediaEmbedding(kind=decoder_pb2.MEDIA_KIND_VIDEO, grid_thw=grid,
                                  second_per_grid_t=second_per_grid_t, chunk_rows=chunk_rows, digest=digest)


def chunk_message(store, tensor: torch.Tensor, chunk_index: int, media_index: int = 0) -> llm_pb2.LlmInput:
    return llm_pb2.LlmInput(chunk=llm_pb2.MediaChunk(media_index=media_index, chunk_index=chunk_index,
                                                     embeddings=store.to_ref(tensor)))


def split(tensor: torch.Tensor, chunk_rows: list[int]) -> list[torch.Tensor]:
    return list(tensor.split(chunk_rows))


async def tokens_of(call) -> list[int]:
    return [t async for reply in call if reply.WhichOneof("event") == "delta" for t in reply.delta.token_ids]


async def test_chunks_by_shared_memory_out_of_order_answer_like_generate_with_the_whole_tensor(llm, packed_video,
                                                                                               store):
    address, _ = llm
    tensor, grid, second_per_grid_t = packed_video
    async with grpc.aio.insecure_channel(address, options=rpc.message_options(64 * 1024 * 1024)) as channel:
        stub = llm_pb2_grpc.LlmStub(channel)
        whole = llm_pb2.MediaEmbedding(kind=decoder_pb2.MEDIA_KIND_VIDEO, grid_thw=grid,
                                       second_per_grid_t=second_per_grid_t, embeddings=store.to_ref(tensor))
        expected = await tokens_of(stub.Generate(llm_request(whole, request_id="whole"), timeout=120))
        assert len(expected) == NUM_TOKENS
        chunk_rows = [2 * ROWS, 2 * ROWS, 2 * ROWS, ROWS]
        pieces = split(tensor, chunk_rows)

        async def inputs():
            yield llm_pb2.LlmInput(request=llm_request(planned(grid, second_per_grid_t, chunk_rows)))
            for index in (2, 0, 3, 1):
                yield chunk_message(store, pieces[index], index)

        assert await tokens_of(stub.GenerateStreamed(inputs(), timeout=120)) == expected
    assert shm.list_segments(store.prefix) == [], "the llm mapped and unlinked every chunk's segment"


@pytest.mark.parametrize("field, chunk_index, rows", [("chunk.embeddings", 1, ROWS + 1),
                                                      ("chunk.chunk_index", 4, ROWS),
                                                      ("chunk.media_index", 0, ROWS)])
async def test_a_malformed_chunk_is_invalid_argument_naming_the_field(llm, packed_video, store, field, chunk_index,
                                                                      rows):
    address, _ = llm
    tensor, grid, second_per_grid_t = packed_video
    chunk_rows = [ROWS, 3 * ROWS, 3 * ROWS]
    async with grpc.aio.insecure_channel(address, options=rpc.message_options(64 * 1024 * 1024)) as channel:
        stub = llm_pb2_grpc.LlmStub(channel)

        async def inputs():
            yield llm_pb2.LlmInput(request=llm_request(planned(grid, second_per_grid_t, chunk_rows),
                                                       request_id=f"bad-{field}"))
            yield chunk_message(store, tensor[:ROWS], 0)
            yield chunk_message(store, tensor[:rows], chunk_index, media_index=1 if field == "chunk.media_index" else 0)
            await asyncio.Event().wait()  # the client keeps its input open: the llm must end the call

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await tokens_of(stub.GenerateStreamed(inputs(), timeout=120))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(field + ":"), err.value.details()


@pytest.mark.parametrize("tpot_ms", [-1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["Generate", "GenerateStreamed"])
async def test_a_time_per_token_target_that_is_not_a_finite_non_negative_number_is_invalid_argument(llm, tpot_ms,
                                                                                                   method):
    address, _ = llm
    request = llm_pb2.LlmRequest(request_id="bad-tpot", tpot_ms=tpot_ms, messages=[llm_pb2.LlmMessage(
        role="user", parts=[llm_pb2.LlmPart(text="hi")])], sampling=api_pb2.SamplingParams(max_tokens=2, min_tokens=2))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = llm_pb2_grpc.LlmStub(channel)

        async def inputs():
            yield llm_pb2.LlmInput(request=request)

        call = stub.Generate(request, timeout=60) if method == "Generate" else stub.GenerateStreamed(inputs(),
                                                                                                 timeout=60)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await tokens_of(call)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("tpot_ms:"), err.value.details()
        request.tpot_ms = 40.0  # a target it can take: served
        assert len(await tokens_of(stub.Generate(request, timeout=60))) == 2


def long_text_request(tiny_model, request_id: str) -> llm_pb2.LlmRequest:
    """A text request whose prompt and output take more than three quarters of the whole KV cache."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    num_tokens = lambda text: len(tokenizer.encode(tokenizer.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)))
    words = "word"
    while num_tokens(words) + NUM_TOKENS < NUM_BLOCKS * BLOCK_SIZE * 0.8:
        words += " word"
    return llm_pb2.LlmRequest(request_id=request_id, messages=[llm_pb2.LlmMessage(
        role="user", parts=[llm_pb2.LlmPart(text=words)])],
        sampling=api_pb2.SamplingParams(max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS, temperature=0.0))


@pytest.mark.parametrize("how", ["cancelled", "input_closed"])
async def test_a_client_gone_mid_stream_frees_its_blocks_and_segments(llm, packed_video, store, tiny_model, how):
    address, metrics_port = llm
    tensor, grid, second_per_grid_t = packed_video
    chunk_rows = [2 * ROWS, 2 * ROWS, 2 * ROWS, ROWS]
    pieces = split(tensor, chunk_rows)
    received = metric(metrics_port, "mmserve_llm_media_chunks_received_total")
    client = grpc.aio.insecure_channel(address, options=rpc.message_options(64 * 1024 * 1024))

    async def inputs():
        yield llm_pb2.LlmInput(request=llm_request(planned(grid, second_per_grid_t, chunk_rows),
                                                   request_id=f"gone-{how}"))
        for index in (0, 2):
            yield chunk_message(store, pieces[index], index)
        if how == "cancelled":
            await asyncio.Event().wait()  # the input stays open until the client goes away

    reading = asyncio.ensure_future(tokens_of(llm_pb2_grpc.LlmStub(client).GenerateStreamed(inputs(), timeout=120)))
    # The llm holds the prompt's blocks and waits for chunk 1, having read chunks 0 and 2.
    await wait_for_metric(metrics_port, "mmserve_llm_media_chunks_received_total", received + 2)
    if how == "cancelled":
        await wait_for_metric(metrics_port, "mmserve_llm_media_waiting_sequences", 1)
        assert metric(metrics_port, "mmserve_llm_kv_blocks_used") > 0
        await client.close()  # the client goes away: its calls are cancelled
        await asyncio.gather(reading, return_exceptions=True)
    else:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await reading
        assert err.value.code() == grpc.StatusCode.ABORTED and "closed before" in err.value.details()
        await client.close()
    assert shm.list_segments(store.prefix) == [], "the chunks it received were mapped and unlinked"
    async with grpc.aio.insecure_channel(address) as channel:
        # Served only once the abandoned prompt's blocks are back: it needs more than the rest of the cache.
        follow_up = llm_pb2_grpc.LlmStub(channel).Generate(long_text_request(tiny_model, f"after-{how}"), timeout=120)
        assert len(await tokens_of(follow_up)) == NUM_TOKENS
    await wait_for_metric(metrics_port, "mmserve_llm_kv_blocks_used", 0)
    assert metric(metrics_port, "mmserve_llm_media_waiting_sequences") == 0


async def wait_for_metric(port: int, name: str, value: float, timeout_s: float = 60.0) -> None:
    """Polls the llm's Prometheus endpoint until name reads value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while await asyncio.to_thread(metric, port, name) != value:
        assert loop.time() < deadline, f"{name} never reached {value}"
        await asyncio.sleep(0.02)
