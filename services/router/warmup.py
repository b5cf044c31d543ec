"""Warm-up profile: one small image through every decoder and encoder, one short prompt through every llm.

It seeds each replica's cost models with a measurement before real traffic arrives, and warms the
replicas' lazy paths (worker processes, kernels) so the first user request does not pay for them.
"""

from __future__ import annotations

import logging
import math
import time

import grpc

from mmserve import transport
from mmserve.media.samples import make_image
from mmserve.models.family import Family, MediaItem
from mmserve.v1 import api_pb2, decoder_pb2, encoder_pb2, llm_pb2
from services.router.costs import encode_work_ms
from services.router.planning import num_patches
from services.router.pools import Pools

log = logging.getLogger(__name__)

_TIMEOUT_S = 60.0


async def warm_up(pools: Pools, family: Family) -> None:
    """Profiles every healthy replica once; failures are logged and ignored (live traffic refines anyway)."""
    try:
        for pool in pools:
            await pool.wait_healthy(_TIMEOUT_S)
        image = make_image(width=224, height=224, fmt="PNG")
        decoders = pools.decoders.healthy()
        for i, encoder in enumerate(pools.encoders.healthy()):
            frames, grid = await _decode(decoders[i % len(decoders)], image, family)
            await _encode(encoder, frames, grid, family)
        for llm in pools.llms.healthy():
            await _prefill(llm)
        log.info("warm-up profile done")
    except (grpc.aio.AioRpcError, TimeoutError) as err:
        log.warning("warm-up profile incomplete: %s", err)


async def _decode(decoder, image: bytes, family: Family):
    params = family.default_params("image")  # what a request that asks for nothing gets
    request = decoder_pb2.DecodeRequest(request_id="warmup", kind=decoder_pb2.MEDIA_KIND_IMAGE, data=image,
                                        min_pixels=params.min_pixels, max_pixels=params.max_pixels)
    start = time.perf_counter()
    chunks = [c async for c in decoder.stub.Decode(request, timeout=_TIMEOUT_S, metadata=transport.caller_metadata())]
    decoder.costs.observe(1, math.prod(chunks[0].frames.shape[:3]), (time.perf_counter() - start) * 1e3)
    return chunks[0].frames, chunks[0].grid


async def _encode(encoder, frames, grid, family: Family) -> None:
    reply = await encoder.stub.Encode(encoder_pb2.EncodeRequest(request_id="warmup", kind=decoder_pb2.MEDIA_KIND_IMAGE,
                                                                frames=frames, grid=grid),
                                      timeout=_TIMEOUT_S, metadata=transport.caller_metadata())
    encoder.costs.observe(num_patches(family, MediaItem("image", tuple(reply.grid_thw))), encode_work_ms(reply))
    await transport.release([reply.embeddings])  # nobody consumes a warm-up embedding: end its lease now


async def _prefill(llm) -> None:
    request = llm_pb2.LlmRequest(
        request_id="warmup", messages=[llm_pb2.LlmMessage(role="user", parts=[llm_pb2.LlmPart(text="warm up " * 16)])],
        sampling=api_pb2.SamplingParams(max_tokens=8, min_tokens=8, temperature=0.0))
    first_token = 0.0
    async for reply in llm.stub.Generate(request, timeout=_TIMEOUT_S):
        if reply.WhichOneof("event") == "final":
            llm.costs.prefill.observe(reply.final.prompt_tokens, reply.final.prefill_ms)
            llm.costs.step.observe(1, (time.perf_counter() - first_token) * 1e3 / 7)
        else:
            first_token = first_token or time.perf_counter()

