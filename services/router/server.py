"""The public Router servicer: validate, embed media (cache or decode → encode), stream from the llm."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc

from mmserve.media.preprocess import MediaError
from mmserve.v1 import api_pb2, api_pb2_grpc, llm_pb2
from services.router.config import RouterConfig
from services.router.media import Embedded, MediaItem, MediaStage
from services.router.replicas import ReplicaPool, is_client_error
from services.router.validation import ValidationError, validate_request

log = logging.getLogger(__name__)


class StageError(Exception):
    """A stage failed; carries the status the client should see."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _stage_error(stage: str, err: grpc.aio.AioRpcError) -> StageError:
    if is_client_error(err):
        return StageError(err.code(), err.details() or f"{stage}: {err.code().name}")
    return StageError(grpc.StatusCode.UNAVAILABLE, f"{stage}: replica unavailable ({err.code().name})")


def media_items(request: api_pb2.GenerateRequest) -> list[MediaItem]:
    """Every image and video of the request, in prompt order."""
    return [MediaItem(kind, getattr(part, kind), f"messages[{i}].parts[{j}].{kind}")
            for i, m in enumerate(request.messages) for j, part in enumerate(m.parts)
            if (kind := part.WhichOneof("content")) in ("image", "video")]


async def _all_or_nothing(coros) -> list:
    """Runs coroutines together; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


class RouterServicer(api_pb2_grpc.RouterServicer):
    def __init__(self, config: RouterConfig, media: MediaStage, llms: ReplicaPool):
        self.config = config
        self.media = media
        self.llms = llms

    async def Generate(self, request: api_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        request_id = request.request_id or uuid.uuid4().hex
        remaining = context.time_remaining()
        deadline = start + (remaining if remaining is not None else self.config.request_timeout_s)
        try:
            validate_request(request, max_messages=self.config.max_messages,
                             max_media=self.config.max_media_per_request,
                             max_tokens_limit=self.config.max_tokens_limit,
                             max_media_bytes=self.config.max_media_bytes)
            items = media_items(request)
            embedded = await self._embed_all(request_id, items, deadline)
        except (ValidationError, MediaError) as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except StageError as err:
            await context.abort(err.code, str(err))
        media_done = time.perf_counter()
        llm_request = self._llm_request(request, request_id, iter(embedded))
        llm_request.priority = time.time() + (request.slo.ttft_ms / 1e3 if request.slo.ttft_ms
                                              else deadline - time.perf_counter())
        first_token = None
        try:
            stream = self.llms.pick().Generate(llm_request, timeout=max(0.001, deadline - time.perf_counter()))
            async for reply in stream:
                if reply.WhichOneof("event") == "delta":
                    first_token = first_token or time.perf_counter()
                    yield api_pb2.GenerateResponse(delta=reply.delta)
                    continue
                yield api_pb2.GenerateResponse(final=self._final(reply.final, request_id, embedded,
                                                                 start, media_done, first_token))
        except grpc.aio.AioRpcError as err:
            error = _stage_error("llm", err)
            await context.abort(error.code, str(error))

    async def _embed_all(self, request_id: str, items: list[MediaItem], deadline: float) -> list[Embedded]:
        try:
            return await _all_or_nothing(
                self.media.embed(request_id, item, max(0.001, deadline - time.perf_counter())) for item in items)
        except grpc.aio.AioRpcError as err:
            raise _stage_error("media", err) from None

    @staticmethod
    def _llm_request(request: api_pb2.GenerateRequest, request_id: str, embedded) -> llm_pb2.LlmRequest:
        messages = []
        for m in request.messages:
            parts = [llm_pb2.LlmPart(text=p.text) if p.WhichOneof("content") == "text"
                     else llm_pb2.LlmPart(media=next(embedded).embedding) for p in m.parts]
            messages.append(llm_pb2.LlmMessage(role=m.role, parts=parts))
        return llm_pb2.LlmRequest(request_id=request_id, messages=messages, sampling=request.sampling)

    @staticmethod
    def _final(final: llm_pb2.LlmFinal, request_id: str, embedded: list[Embedded], start: float,
               media_done: float, first_token: float | None) -> api_pb2.Final:
        end = time.perf_counter()
        ttft = ((first_token or end) - start) * 1e3
        total = (end - start) * 1e3
        num_cached = sum(e.cached for e in embedded)
        timings = api_pb2.Timings(
            queue_ms=final.queue_ms,
            decode_ms=max((e.decode_ms for e in embedded), default=0.0),
            encode_ms=max((e.encode_ms for e in embedded), default=0.0),
            prefill_ms=final.prefill_ms, ttft_ms=ttft, total_ms=total,
            tpot_ms=(total - ttft) / (final.completion_tokens - 1) if final.completion_tokens > 1 else 0.0)
        return api_pb2.Final(finish_reason=final.finish_reason, prompt_tokens=final.prompt_tokens,
                             completion_tokens=final.completion_tokens, timings=timings,
                             media_cached=bool(embedded) and num_cached == len(embedded),
                             num_media=len(embedded), num_media_cached=num_cached, request_id=request_id)
