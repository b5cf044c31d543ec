"""The public Router servicer: validate, admit against the SLO, embed media, stream from the llm."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid

import grpc

from mmserve import rpc
from mmserve.media.errors import MediaError
from mmserve.v1 import api_pb2, api_pb2_grpc, llm_pb2
from services.router import metrics
from services.router.admission import Controller, Ticket
from services.router.config import RouterConfig
from services.router.failover import Failover, ReplicaDown, is_down
from services.router.media import Embedded, MediaItem, MediaStage, Prepared, all_or_nothing
from services.router.planning import PromptBudget, PromptSize
from services.router.replicas import NoReplicaError, PoolFull, Replica, ReplicaPool, is_client_error
from services.router.streamed import ChunkFeed, ChunkMismatch, FeedFailed, StreamedLlmDown, StreamingUnsupported
from services.router.validation import RequestLimits, ValidationError, validate_request

log = logging.getLogger(__name__)


class EmbeddingsEvicted(Exception):
    """The llm found a request's embeddings gone before it produced anything: a cache key's entry evicted after
    our lookup, or the encoder that made them went away."""


class StageError(Exception):
    """A stage failed; carries the status the client should see."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: float = 0.0):
        super().__init__(message)
        self.code = code
        self.retry_after_ms = retry_after_ms  # a RESOURCE_EXHAUSTED's hint (0: the router makes one)


def _stage_error(stage: str, err: grpc.aio.AioRpcError) -> StageError:
    if is_client_error(err):
        return StageError(err.code(), err.details() or f"{stage}: {err.code().name}")
    log.warning("%s: %s from a replica, answered UNAVAILABLE: %s", stage, err.code().name, err.details())
    return StageError(grpc.StatusCode.UNAVAILABLE, f"{stage}: replica unavailable ({err.code().name})")


def _media_failure(err: Exception) -> Exception:
    """The client's status for a failed decode or encode (other errors, a MediaError, as they are)."""
    if isinstance(err, ReplicaDown):
        return _stage_error(err.stage, err.error)
    if isinstance(err, grpc.aio.AioRpcError):
        return _stage_error("media", err)
    if isinstance(err, NoReplicaError):
        return StageError(grpc.StatusCode.UNAVAILABLE, str(err))
    if isinstance(err, PoolFull):
        return StageError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
    if isinstance(err, ChunkMismatch):
        return StageError(grpc.StatusCode.INTERNAL, str(err))
    return err


def media_items(request: api_pb2.GenerateRequest) -> list[MediaItem]:
    """Every image and video of the request, in prompt order."""
    return [MediaItem(kind, getattr(part, kind), f"messages[{i}].parts[{j}].{kind}")
            for i, m in enumerate(request.messages) for j, part in enumerate(m.parts)
            if (kind := part.WhichOneof("content")) in ("image", "video")]


class RouterServicer(api_pb2_grpc.RouterServicer):
    def __init__(self, config: RouterConfig, media: MediaStage, llms: ReplicaPool, controller: Controller,
                 limits: RequestLimits, budget: PromptBudget):
        self.config = config
        self.media = media
        self.llms = llms
        self.controller = controller
        self.limits = limits
        self.budget = budget
        self.can_stream = config.stream_prefill  # False once an llm answered that it has no GenerateStreamed

    async def Generate(self, request: api_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        """validate → prepare media → admit → embed → stream; a failed step ends the call with its status."""
        start = time.perf_counter()
        remaining = context.time_remaining()
        deadline = start + (remaining if remaining is not None else self.config.request_timeout_s)
        request_id = request.request_id or uuid.uuid4().hex  # checked (a safe alphabet) before it is used
        ticket: Ticket | None = None
        code = grpc.StatusCode.OK
        try:
            self._validate(request, request_id)
            prepared, size = await self._prepare(request)
            ticket, prepared = await self._admit(request, prepared, size, start)
            if self.can_stream and prepared and all(p.chunks is not None for p in prepared):
                try:
                    async for response in self._stream_prefill(request, request_id, ticket, prepared, start,
                                                                deadline):
                        yield response
                    return
                except StreamingUnsupported as err:
                    log.warning("llm without GenerateStreamed (%s): store-and-forward from now on", err)
                    self.can_stream = False
                    prepared = await all_or_nothing(self.media.store_and_forward(p) for p in prepared)
                except StreamedLlmDown as err:
                    log.info("%s: streamed llm call lost before its first reply (%s); again store-and-forward",
                             request_id, err)
                    metrics.RETRIES.labels("llm").inc()
                    prepared = await all_or_nothing(self.media.store_and_forward(p) for p in prepared)
            embedded = await self._embed(request_id, prepared, ticket, deadline)
            async for response in self._stream(request, request_id, ticket, prepared, embedded, start, deadline):
                yield response
        except (StageError, ValidationError, MediaError) as err:
            code = err.code if isinstance(err, StageError) else grpc.StatusCode.INVALID_ARGUMENT
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # every refusal for load says when to come back
                hint = err.retry_after_ms or self.controller.retry_after_ms()
                context.set_trailing_metadata(((rpc.RETRY_AFTER_HEADER, str(int(hint))),))
            await context.abort(code, str(err))
        except (asyncio.CancelledError, GeneratorExit):  # the client went away (mid-stream: the generator closed)
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            if ticket is not None:
                self.controller.release(ticket, is_cancelled=code == grpc.StatusCode.CANCELLED)
            metrics.REQUESTS.labels(ticket.cls if ticket else "unknown", code.name).inc()
            log.info("ended class=%s status=%s ms=%.0f", ticket.cls if ticket else "-", code.name,
                     (time.perf_counter() - start) * 1e3)

    def _validate(self, request: api_pb2.GenerateRequest, request_id: str) -> None:
        """Every field within the server's caps (ValidationError naming the first that is not)."""
        validate_request(request, self.limits)
        rpc.request_id.set(request_id)  # only now: log lines never carry an unchecked id

    async def _prepare(self, request: api_pb2.GenerateRequest) -> tuple[list[Prepared], PromptSize]:
        """Each media item read, looked up in the cache and planned, and the prompt's exact size: a request that
        cannot fit is refused here, before any decode, encode or admission, and never told to retry."""
        prepared = await all_or_nothing(self.media.prepare(i, self.can_stream) for i in media_items(request))
        size = await asyncio.to_thread(self.budget.check, request, [p.family_item for p in prepared])
        return prepared, size

    async def _admit(self, request: api_pb2.GenerateRequest, prepared: list[Prepared], size: PromptSize,
                     now: float) -> tuple[Ticket, list[Prepared]]:
        """The admission ticket, and the items with fewer frames when the request accepted degradation; a refusal
        is RESOURCE_EXHAUSTED with a retry hint."""
        ticket = self.controller.admit(
            [p.item.kind for p in prepared], [p.shape for p in prepared if p.shape is not None], size.num_tokens,
            ttft_ms=request.slo.ttft_ms, tpot_ms=request.slo.tpot_ms, allow_degrade=request.slo.allow_degrade,
            now=now, num_chunks=sum(p.chunks.num_chunks for p in prepared if p.chunks is not None))
        decision = ticket.decision
        if not decision.admit:
            metrics.REFUSED.labels(ticket.cls).inc()
            raise StageError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"over capacity: {decision.reason}; retry after {decision.retry_after_ms:.0f} ms",
                             decision.retry_after_ms)
        if decision.frame_scale < 1.0:
            metrics.DEGRADED.labels(ticket.cls).inc()
            prepared = await all_or_nothing(self.media.degrade(p, decision.frame_scale) for p in prepared)
        return ticket, prepared

    async def _embed(self, request_id: str, prepared: list[Prepared], ticket: Ticket,
                     deadline: float) -> list[Embedded]:
        """Every item's embeddings: cache keys for hits, else decoded and encoded (a dead stage named)."""
        try:
            embedded = await all_or_nothing(
                self.media.embed(request_id, p, deadline=deadline, latest_start=self._latest_start(ticket),
                                 attempts=self.config.stage_attempts) for p in prepared)
        except (ReplicaDown, grpc.aio.AioRpcError, NoReplicaError, PoolFull) as err:
            raise _media_failure(err) from None
        self._media_done(ticket)
        return embedded

    def _media_done(self, ticket: Ticket) -> None:
        """The request's decode and encode work is done: the backlogs stop counting it."""
        self.controller.finish(ticket, "decoder")
        self.controller.finish(ticket, "encoder")

    async def _stream(self, request: api_pb2.GenerateRequest, request_id: str, ticket: Ticket,
                      prepared: list[Prepared], embedded: list[Embedded], start: float, deadline: float):
        """The llm's tokens as deltas, then the final. Cached embeddings evicted between our lookup and the llm's
        read (or whose producer went away) are computed once more and the llm asked again."""
        media_done = time.perf_counter()
        priority = self._priority(ticket, media_done)
        for is_retry in (False, True):
            try:
                async for response in self._responses(self._llm_request(request, request_id, embedded, priority,
                                                                        self._tpot_ms(ticket)),
                                                      ticket, prepared, embedded, start, media_done, deadline):
                    yield response
                return
            except EmbeddingsEvicted as evicted:
                if is_retry:
                    raise StageError(grpc.StatusCode.UNAVAILABLE, f"llm: {evicted}") from None
                log.info("%s: %s; computing the media again", request_id, evicted)
                metrics.RETRIES.labels("evicted").inc()
            # The llm dropped every ref of the request, so all of its media is computed again.
            prepared = [self.media.without_hit(p) for p in prepared]
            embedded = await self._embed(request_id, prepared, ticket, deadline)

    async def _stream_prefill(self, request: api_pb2.GenerateRequest, request_id: str, ticket: Ticket,
                              prepared: list[Prepared], start: float, deadline: float):
        """The llm called at once with the planned prompt, fed each chunk as it is ready (streamed.ChunkFeed)."""
        feed = ChunkFeed(self.media, request_id, prepared, deadline=deadline, latest_start=self._latest_start(ticket),
                         attempts=self.config.stage_attempts, max_in_flight=self.config.max_chunks_in_flight,
                         on_media_done=lambda: self._media_done(ticket))
        now = time.perf_counter()
        priority = self._priority(ticket, now)
        llm_request = self._llm_request(request, request_id, feed.embedded, priority, self._tpot_ms(ticket))
        try:
            async for response in self._responses(llm_request, ticket, prepared, feed.embedded, start, now,
                                                  deadline, feed):
                yield response
        except FeedFailed as failed:
            raise _media_failure(failed.error) from None

    async def _responses(self, llm_request: llm_pb2.LlmRequest, ticket: Ticket, prepared: list[Prepared],
                         embedded: list[Embedded], start: float, media_done: float, deadline: float,
                         feed: ChunkFeed | None = None):
        """One llm call's replies as the client's responses; the final carries the request's timings."""
        first_token = None
        async for reply in self._stream_llm(llm_request, ticket, deadline, prepared, feed):
            if reply.WhichOneof("event") == "delta":
                if first_token is None:
                    first_token = time.perf_counter()
                    # Streamed, decode and encode left the backlogs when the feed ended, unless a prefix the
                    # llm had cached answered first.
                    for stage in ("decoder", "encoder", "llm"):
                        self.controller.finish(ticket, stage)
                yield api_pb2.GenerateResponse(delta=reply.delta)
                continue
            final = self._final(reply.final, llm_request.request_id, embedded, start, media_done, first_token,
                                degraded=any(p.degraded for p in prepared))
            self._record_slo(ticket, final.timings)
            yield api_pb2.GenerateResponse(final=final)

    async def _stream_llm(self, llm_request: llm_pb2.LlmRequest, ticket: Ticket, deadline: float,
                          prepared: list[Prepared], feed: ChunkFeed | None = None):
        """The llm's replies; a replica found down before its first reply is replaced by another (store-and-forward:
        streamed, the chunks already sent are gone with it)."""
        affinity = prepared[0].digest if prepared else None  # its KV prefix may still be cached there
        prefill_ms = ticket.prediction.llm.work_ms
        tries = Failover(self.llms, self.config.stage_attempts, llm_request.request_id)
        while True:
            try:
                async with self.llms.slot(latest_start=ticket.deadline, affinity=affinity, exclude=tries.exclude,
                                          work_ms=lambda r: prefill_ms + r.costs.step.predict(r.num_in_flight)) as llm:
                    self.controller.at_llm(ticket, True)
                    if affinity is not None:
                        self.llms.remember(affinity, llm)
                    async for reply in self._replies(llm, llm_request, deadline, feed):
                        yield reply
                    return
            except ReplicaDown as down:
                self.controller.at_llm(ticket, False)  # its slot is given back; another replica may take it
                if not tries.retry(down.replica):
                    raise _stage_error("llm", down.error) from None
            except NoReplicaError as err:
                raise StageError(grpc.StatusCode.UNAVAILABLE, str(err)) from None

    async def _replies(self, llm: Replica, llm_request: llm_pb2.LlmRequest, deadline: float,
                       feed: ChunkFeed | None = None):
        """One replica's replies, its cost models fed from the final; ReplicaDown when it was gone before its first
        reply (another may be tried), UNAVAILABLE naming the tokens delivered when it went away after."""
        stream = (feed.replies(llm, llm_request) if feed is not None else
                  llm.stub.Generate(llm_request, timeout=max(0.001, deadline - time.perf_counter())))
        first_token = 0.0
        num_delivered = 0
        try:
            async for reply in stream:
                if reply.WhichOneof("event") == "final":
                    self._observe_llm(llm, reply.final, first_token)
                else:
                    first_token = first_token or time.perf_counter()
                    num_delivered += len(reply.delta.token_ids)
                yield reply
        except grpc.aio.AioRpcError as err:
            started = bool(first_token)
            # Evicted cache entries, or embeddings whose producer went away: compute them again.
            if not started and (err.code() == grpc.StatusCode.NOT_FOUND or rpc.is_input_gone(err)):
                if feed is not None:  # streamed chunks are not kept to be sent again
                    raise StageError(grpc.StatusCode.UNAVAILABLE, f"llm: {err.details()}") from None
                raise EmbeddingsEvicted(err.details()) from None
            if not is_down(err):
                raise _stage_error("llm", err) from None
            if not started and feed is None:
                raise ReplicaDown("llm", llm, err) from None
            if not started:
                self.llms.mark_failed(llm)
                raise StreamedLlmDown(err.details()) from None
            self.llms.mark_failed(llm)  # the client has part of the answer: a blind retry would repeat or differ
            raise StageError(grpc.StatusCode.UNAVAILABLE, f"llm: replica lost after {num_delivered} tokens were "
                                                          "delivered; not safe to retry blindly") from None

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

    def _priority(self, ticket: Ticket, now: float) -> float:
        """The llm's priority for the request (Unix seconds, earliest first): its first-token deadline under the
        slo policy, its arrival there under fcfs; now on the perf_counter clock of the ticket's deadline."""
        return time.time() + (ticket.deadline - now if self.config.policy == "slo" else 0.0)

    def _latest_start(self, ticket: Ticket) -> float:
        """When the request's media work must start at the latest, which orders the stages' queues (least slack
        first) under the slo policy; fcfs serves in arrival order (inf: no due time is sent)."""
        return ticket.latest_start if self.config.policy == "slo" else math.inf

    def _tpot_ms(self, ticket: Ticket) -> float:
        """The time-per-token target the llm shapes its steps by: the request's, under the slo policy (fcfs, as it
        ranks by arrival, leaves the steps to the token budget)."""
        return ticket.slo.tpot_ms if self.config.policy == "slo" else 0.0

    @staticmethod
    def _llm_request(request: api_pb2.GenerateRequest, request_id: str, embedded: list[Embedded],
                     priority: float, tpot_ms: float) -> llm_pb2.LlmRequest:
        items = iter(embedded)
        messages = [llm_pb2.LlmMessage(role=m.role, parts=[
            llm_pb2.LlmPart(text=p.text) if p.WhichOneof("content") == "text" else llm_pb2.LlmPart(
                media=next(items).embedding) for p in m.parts]) for m in request.messages]
        return llm_pb2.LlmRequest(request_id=request_id, messages=messages, sampling=request.sampling,
                                  priority=priority, tpot_ms=tpot_ms)

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
