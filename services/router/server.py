"""The public Router servicer: validate, admit against the SLO, embed media, stream from the llm."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc

from mmserve import rpc
from mmserve.media.errors import MediaError
from mmserve.v1 import api_pb2, api_pb2_grpc, llm_pb2
from services.router import metrics
from services.router.admission import Controller, Ticket
from services.router.config import RouterConfig
from services.router.media import Embedded, MediaItem, MediaStage, Prepared, ReplicaDown
from services.router.planning import PromptBudget, PromptSize
from services.router.replicas import NoReplicaError, PoolFull, ReplicaPool, is_client_error
from services.router.validation import RequestLimits, ValidationError, validate_request

log = logging.getLogger(__name__)


class EmbeddingsEvicted(Exception):
    """The llm found a request's embeddings gone before it produced anything: a cache key's entry evicted after
    our lookup, or the encoder that made them went away."""


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
    def __init__(self, config: RouterConfig, media: MediaStage, llms: ReplicaPool, controller: Controller,
                 limits: RequestLimits, budget: PromptBudget):
        self.config = config
        self.media = media
        self.llms = llms
        self.controller = controller
        self.limits = limits
        self.budget = budget

    async def Generate(self, request: api_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        request_id = request.request_id or uuid.uuid4().hex  # checked (a safe alphabet) before it is used
        remaining = context.time_remaining()
        deadline = start + (remaining if remaining is not None else self.config.request_timeout_s)
        ticket: Ticket | None = None
        code = grpc.StatusCode.OK
        try:
            try:
                validate_request(request, self.limits)
                rpc.request_id.set(request_id)
                prepared = await _all_or_nothing(self.media.prepare(i) for i in media_items(request))
                # Exact, before any decode, encode or admission: a request that cannot fit never gets a retry hint.
                size = await asyncio.to_thread(self.budget.check, request, [p.num_patches for p in prepared])
                ticket, prepared = await self._admit(request, prepared, size, start)
                if not ticket.decision.admit:
                    metrics.REFUSED.labels(ticket.cls).inc()
                    context.set_trailing_metadata((("retry-after-ms", str(int(ticket.decision.retry_after_ms))),))
                    raise StageError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     f"over capacity: {ticket.decision.reason}; retry after "
                                     f"{ticket.decision.retry_after_ms:.0f} ms")
                embedded = await self._embed_all(request_id, prepared, ticket, deadline)
            except (ValidationError, MediaError) as err:
                raise StageError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
            self.controller.finish(ticket, "decoder")
            self.controller.finish(ticket, "encoder")
            media_done = time.perf_counter()
            llm_request = self._llm_request(request, request_id, iter(embedded))
            # The llm serves earliest deadline first (Unix seconds); fcfs ranks by arrival instead.
            llm_request.priority = time.time() + (ticket.deadline - time.perf_counter()
                                                  if self.config.policy == "slo" else 0.0)
            first_token = None
            async for reply in self._stream_llm_or_recompute(request, request_id, llm_request, embedded, ticket,
                                                             deadline, prepared):
                if reply.WhichOneof("event") == "delta":
                    if first_token is None:
                        first_token = time.perf_counter()
                        self.controller.finish(ticket, "llm")
                    yield api_pb2.GenerateResponse(delta=reply.delta)
                    continue
                final = self._final(reply.final, request_id, embedded, start, media_done, first_token,
                                    degraded=any(p.degraded for p in prepared))
                self._record_slo(ticket, final.timings)
                yield api_pb2.GenerateResponse(final=final)
        except StageError as err:
            code = err.code
            await context.abort(err.code, str(err))
        except (asyncio.CancelledError, GeneratorExit):  # the client went away (mid-stream: the generator closed)
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            if ticket is not None:
                self.controller.release(ticket, is_cancelled=code == grpc.StatusCode.CANCELLED)
            metrics.REQUESTS.labels(ticket.cls if ticket else "unknown", code.name).inc()
            log.info("ended class=%s status=%s ms=%.0f", ticket.cls if ticket else "-", code.name,
                     (time.perf_counter() - start) * 1e3)

    async def _admit(self, request: api_pb2.GenerateRequest, prepared: list[Prepared], size: PromptSize,
                     now: float) -> tuple[Ticket, list[Prepared]]:
        """The admission ticket, and the items with fewer frames when the request accepted degradation."""
        shapes = [p.shape for p in prepared if p.hit is None]
        ticket = self.controller.admit(
            [p.item.kind for p in prepared], shapes, size.num_tokens,
            ttft_ms=request.slo.ttft_ms, tpot_ms=request.slo.tpot_ms, allow_degrade=request.slo.allow_degrade,
            now=now)
        if ticket.decision.admit and ticket.decision.frame_scale < 1.0:
            metrics.DEGRADED.labels(ticket.cls).inc()
            prepared = await _all_or_nothing(self.media.degrade(p, ticket.decision.frame_scale) for p in prepared)
        return ticket, prepared

    async def _embed_all(self, request_id: str, prepared: list[Prepared], ticket: Ticket,
                         deadline: float) -> list[Embedded]:
        try:
            return await _all_or_nothing(
                self.media.embed(request_id, p, deadline=deadline, latest_start=ticket.latest_start,
                                 attempts=self.config.stage_attempts) for p in prepared)
        except ReplicaDown as down:
            raise _stage_error(down.pool.stage, down.error) from None
        except grpc.aio.AioRpcError as err:
            raise _stage_error("media", err) from None
        except NoReplicaError as err:
            raise StageError(grpc.StatusCode.UNAVAILABLE, str(err)) from None
        except PoolFull as err:
            raise StageError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)) from None

    async def _stream_llm_or_recompute(self, request: api_pb2.GenerateRequest, request_id: str,
                                       llm_request: llm_pb2.LlmRequest, embedded: list[Embedded], ticket: Ticket,
                                       deadline: float, prepared: list[Prepared]):
        """The llm's replies; when it found cached embeddings evicted since our lookup, the media is computed
        again (embedded and prepared are updated in place) and the llm asked once more."""
        try:
            async for reply in self._stream_llm(llm_request, ticket, deadline, prepared):
                yield reply
            return
        except EmbeddingsEvicted as evicted:
            log.info("%s: %s; computing the media again", request_id, evicted)
            metrics.RETRIES.labels("evicted").inc()
        # The llm dropped every ref of the request, so all of its media is computed again.
        prepared[:] = [self.media.without_hit(p) for p in prepared]
        embedded[:] = await self._embed_all(request_id, prepared, ticket, deadline)
        retry = self._llm_request(request, request_id, iter(embedded))
        retry.priority = llm_request.priority
        async for reply in self._stream_llm(retry, ticket, deadline, prepared):
            yield reply

    async def _stream_llm(self, llm_request: llm_pb2.LlmRequest, ticket: Ticket, deadline: float,
                          prepared: list[Prepared]):
        """The llm's replies; a replica that is unavailable before its first reply is replaced by another."""
        affinity = prepared[0].digest if prepared else None  # its KV prefix may still be cached there
        prefill_ms = ticket.prediction.llm.work_ms
        exclude: frozenset[str] = frozenset()
        for attempt in range(self.config.stage_attempts):
            started = False
            try:
                async with self.llms.slot(latest_start=ticket.deadline, affinity=affinity, exclude=exclude,
                                          work_ms=lambda r: prefill_ms + r.costs.step.predict(r.num_in_flight)) as llm:
                    if affinity is not None:
                        self.llms.remember(affinity, llm)
                    stream = llm.stub.Generate(llm_request, timeout=max(0.001, deadline - time.perf_counter()))
                    first_token = 0.0
                    num_delivered = 0
                    try:
                        async for reply in stream:
                            started = True
                            if reply.WhichOneof("event") == "final":
                                self._observe_llm(llm, reply.final, first_token)
                            else:
                                first_token = first_token or time.perf_counter()
                                num_delivered += len(reply.delta.token_ids)
                            yield reply
                        return
                    except grpc.aio.AioRpcError as err:
                        # Evicted cache entries, or embeddings whose producer went away: compute them again.
                        if not started and (err.code() == grpc.StatusCode.NOT_FOUND or rpc.is_input_gone(err)):
                            raise EmbeddingsEvicted(err.details()) from None
                        if err.code() != grpc.StatusCode.UNAVAILABLE:
                            raise _stage_error("llm", err) from None
                        self.llms.mark_failed(llm)
                        if started:  # the client has part of the answer: a blind retry would repeat or differ
                            raise StageError(grpc.StatusCode.UNAVAILABLE,
                                             f"llm: replica lost after {num_delivered} tokens were delivered; not "
                                             "safe to retry blindly") from None
                        if attempt + 1 == self.config.stage_attempts:
                            raise _stage_error("llm", err) from None
                        exclude |= {llm.address}
                        metrics.RETRIES.labels("llm").inc()
                        log.warning("%s: llm %s unavailable, retrying elsewhere", llm_request.request_id,
                                    llm.address)
            except NoReplicaError as err:
                raise StageError(grpc.StatusCode.UNAVAILABLE, str(err)) from None

    def _observe_llm(self, llm, final: llm_pb2.LlmFinal, first_token: float) -> None:
        """Feeds the replica's cost models: prefill by prompt tokens, decode step by the sequences it ran with."""
        llm.costs.prefill.observe(final.prompt_tokens, final.prefill_ms)
        if final.completion_tokens > 1 and first_token:
            tpot_ms = (time.perf_counter() - first_token) * 1e3 / (final.completion_tokens - 1)
            batch = final.decode_batch or llm.num_in_flight
            self.controller.record_step(llm.costs.step.predict(batch), tpot_ms)  # before it learns from it
            llm.costs.step.observe(batch, tpot_ms)
        metrics.STAGE_SECONDS.labels("prefill").observe(final.prefill_ms / 1e3)
        metrics.STAGE_SECONDS.labels("llm_queue").observe(final.queue_ms / 1e3)

    def _record_slo(self, ticket: Ticket, timings: api_pb2.Timings) -> None:
        metrics.TTFT_SECONDS.labels(ticket.cls).observe(timings.ttft_ms / 1e3)
        metrics.STAGE_SECONDS.labels("total").observe(timings.total_ms / 1e3)
        met = timings.ttft_ms <= ticket.slo.ttft_ms and timings.tpot_ms <= ticket.slo.tpot_ms
        self.controller.record(ticket, timings.ttft_ms, met)
        outcome = "met" if met else "missed_ttft" if timings.ttft_ms > ticket.slo.ttft_ms else "missed_tpot"
        metrics.SLO.labels(ticket.cls, outcome).inc()

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
               media_done: float, first_token: float | None, *, degraded: bool) -> api_pb2.Final:
        end = time.perf_counter()
        ttft = ((first_token or end) - start) * 1e3
        total = (end - start) * 1e3
        num_cached = sum(e.cached for e in embedded)
        timings = api_pb2.Timings(
            queue_ms=final.queue_ms,
            decode_ms=max((e.decode_ms for e in embedded), default=0.0),
            encode_ms=max((e.encode_ms for e in embedded), default=0.0),
            prefill_ms=final.prefill_ms, ttft_ms=ttft, total_ms=total,
            tpot_ms=(total - ttft) / (final.completion_tokens - 1) if final.completion_tokens > 1 else 0.0,
            media_wait_ms=max((e.wait_ms for e in embedded), default=0.0))
        return api_pb2.Final(finish_reason=final.finish_reason, prompt_tokens=final.prompt_tokens,
                             completion_tokens=final.completion_tokens, timings=timings,
                             media_cached=bool(embedded) and num_cached == len(embedded),
                             num_media=len(embedded), num_media_cached=num_cached, request_id=request_id,
                             degraded=degraded)
