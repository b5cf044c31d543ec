"""The Llm gRPC servicer: protobuf in (embeddings by ref or by cache key), engine events out."""

from __future__ import annotations

import asyncio
import math

import grpc

from mmserve import rpc, transport
from mmserve.cache import EmbeddingCache, join_chunks
from mmserve.models.family import unpack
from mmserve.sampling import sampling_from_proto
from mmserve.v1 import api_pb2, decoder_pb2, llm_pb2, llm_pb2_grpc
from services.llm.engine import Delta, Engine, EngineOverloaded, Finished
from services.llm.prompt import ChatMessage, MediaInput

_KINDS = {decoder_pb2.MEDIA_KIND_IMAGE: "image", decoder_pb2.MEDIA_KIND_VIDEO: "video"}
_ROLES = ("system", "user", "assistant")


class EmbeddingsEvicted(Exception):
    """A cache key the router sent has no entry (any more): NOT_FOUND, and the router computes it again."""


class StreamClosed(Exception):
    """GenerateStreamed's input ended before every planned chunk arrived: ABORTED."""


def check_messages(messages) -> list[llm_pb2.MediaEmbedding]:
    """The media of messages in prompt order; ValueError naming the first malformed role or media part."""
    media = []
    for i, m in enumerate(messages):
        if m.role not in _ROLES:
            raise ValueError(f"messages[{i}].role: unknown role {m.role!r}")
        for part in m.parts:
            if part.WhichOneof("content") != "media":
                continue
            if part.media.kind not in _KINDS or len(part.media.grid_thw) != 3:
                raise ValueError(f"messages[{i}]: media without a kind or a 3-int grid_thw")
            media.append(part.media)
    return media


def tpot_target(request: llm_pb2.LlmRequest) -> float:
    """The request's time-per-token target in ms (0: none); ValueError for one that is not a finite non-negative
    number."""
    if not 0 <= request.tpot_ms < math.inf:
        raise ValueError(f"tpot_ms: {request.tpot_ms} is not a finite non-negative number of milliseconds")
    return request.tpot_ms


async def cached_refs(cache: EmbeddingCache | None, media: list[llm_pb2.MediaEmbedding]) -> list:
    """Each item's embeddings ref: its own, or joined from its cache entries (one round trip for all keys)."""
    keys = [k for m in media for k in m.cache_keys]
    if keys and cache is None:
        raise EmbeddingsEvicted("embedding cache: this llm has none (--redis-url), so it cannot read cache keys")
    entries = iter(await cache.get_many(keys) if keys else [])
    refs = []
    for i, m in enumerate(media):
        if not m.cache_keys:
            refs.append(m.embeddings)
            continue
        joined = join_chunks([next(entries) for _ in m.cache_keys])
        if joined is None or list(joined.grid_thw) != list(m.grid_thw):
            raise EmbeddingsEvicted(f"embedding cache: media item {i} is no longer cached (evicted)")
        refs.append(joined.embeddings)
    return refs


def messages_from_proto(messages, embeddings: list | None, hidden_size: int) -> list[ChatMessage]:
    """Internal chat messages, the media parts taking embeddings (packed tensors, in prompt order, split into the
    embeddings and their DeepStack layers of hidden_size columns each); embeddings None: the media only planned,
    their embeddings to arrive in chunks (GenerateStreamed)."""
    tensors = iter(embeddings or ())
    out = []
    for i, m in enumerate(messages):
        parts: list[str | MediaInput] = []
        for part in m.parts:
            if part.WhichOneof("content") == "text":
                parts.append(part.text)
                continue
            media = part.media
            if embeddings is None:
                if media.HasField("embeddings") or media.cache_keys:
                    raise ValueError(f"messages[{i}].media.embeddings: GenerateStreamed takes them in chunks")
                parts.append(MediaInput(_KINDS[media.kind], None, tuple(media.grid_thw), media.second_per_grid_t,
                                        tuple(media.timestamps), chunk_rows=tuple(media.chunk_rows),
                                        digest=media.digest))
                continue
            tensor = next(tensors)
            if tensor.dim() != 2:
                raise ValueError(f"messages[{i}].media.embeddings: shape {list(tensor.shape)} is not [rows, columns]")
            try:
                encoded = unpack(tensor, hidden_size)
            except ValueError as err:
                raise ValueError(f"messages[{i}].media.{err}") from None
            parts.append(MediaInput(_KINDS[media.kind], encoded.embeddings, tuple(media.grid_thw),
                                    media.second_per_grid_t, tuple(media.timestamps), encoded.deepstack))
        out.append(ChatMessage(m.role, parts))
    return out


class LlmServicer(llm_pb2_grpc.LlmServicer):
    def __init__(self, engine: Engine, cache: EmbeddingCache | None):
        self.engine = engine
        self.cache = cache

    async def _messages(self, request: llm_pb2.LlmRequest, context) -> list[ChatMessage]:
        """The request's messages with every embedding materialised: mapped, pulled or read from the cache."""
        media = check_messages(request.messages)
        refs = await cached_refs(self.cache, media)
        tensors = await transport.resolve_all(refs, context.time_remaining())
        # A CUDA IPC ref arrives on its GPU; the engine's prefix-cache digest hashes embeddings on the host.
        return messages_from_proto(request.messages, [t.cpu() for t in tensors], self.engine.hidden_size)

    async def Generate(self, request: llm_pb2.LlmRequest, context: grpc.aio.ServicerContext):
        resolving = True
        try:
            options, tpot_ms = sampling_from_proto(request.sampling), tpot_target(request)
            messages = await self._messages(request, context)
            resolving = False
            priority = request.priority or float("inf")
            seq = await asyncio.to_thread(self.engine.prepare, request.request_id, messages, options, priority,
                                          tpot_ms)
            events = self.engine.generate(seq)
            async for event in events:
                yield self._response(event)
        except (ValueError, EngineOverloaded, transport.TensorUnavailable, EmbeddingsEvicted) as err:
            await _abort(context, err)
        finally:
            if resolving:  # refused or cancelled before the embeddings were taken: free the producers' leases
                await transport.release([p.media.embeddings for m in request.messages for p in m.parts
                                         if p.WhichOneof("content") == "media"])

    async def GenerateStreamed(self, inputs, context: grpc.aio.ServicerContext):
        """The request planned first, then its media chunks in any order: prefill runs as far as they reach."""
        seq, feeding, is_queued = None, None, False
        try:
            inputs = aiter(inputs)
            first = await anext(inputs, None)
            if first is None or first.WhichOneof("input") != "request":
                raise ValueError("input: the first message must be the request")
            request = first.request
            options, tpot_ms = sampling_from_proto(request.sampling), tpot_target(request)
            check_messages(request.messages)
            messages = messages_from_proto(request.messages, None, self.engine.hidden_size)
            priority = request.priority or float("inf")
            seq = await asyncio.to_thread(self.engine.prepare, request.request_id, messages, options, priority,
                                          tpot_ms)
            events = self.engine.generate(seq)
            is_queued = True
            await context.send_initial_metadata(())  # queued: the client may send the chunks
            feeding = asyncio.create_task(self._feed(inputs, seq, context))
            async for event in events:
                yield self._response(event)
        except (ValueError, EngineOverloaded, transport.TensorUnavailable, StreamClosed) as err:
            await _abort(context, err)
        finally:
            if feeding is not None:
                feeding.cancel()
            if is_queued:
                self.engine.abort(seq.seq_id)  # a no-op once it finished; else frees its blocks and chunks

    async def _feed(self, inputs, seq, context) -> None:
        """Resolves each chunk as it arrives and hands it to the engine; a chunk that does not fit its plan, one
        that cannot be read, or an input closed early fails the sequence (the error ends its events)."""
        media = seq.mm.streamed
        missing = set(range(media.num_chunks if media is not None else 0))
        try:
            async for message in inputs:
                if message.WhichOneof("input") != "chunk":
                    raise ValueError("input: only the first message may be the request")
                chunk = message.chunk
                try:
                    if media is None:
                        raise ValueError("chunk: the request has no streamed media")
                    index = media.locate(chunk.media_index, chunk.chunk_index, list(chunk.embeddings.shape))
                    if index not in missing:
                        raise ValueError(f"chunk.chunk_index: chunk {chunk.chunk_index} of media item "
                                         f"{chunk.media_index} arrived twice")
                    tensor = await transport.resolve(chunk.embeddings, context.time_remaining())
                except BaseException:
                    await transport.release([chunk.embeddings])
                    raise
                missing.discard(index)
                # A CUDA IPC ref arrives on its GPU; the runner moves each row to the model's device as it splices.
                self.engine.put_chunk(seq, index, unpack(tensor.cpu(), self.engine.hidden_size))
            if missing:
                first = min(missing)
                raise StreamClosed(f"input: closed before media chunk {first} (in prompt order) of "
                                   f"{media.num_chunks} arrived")
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self.engine.fail(seq, err)

    def _response(self, event: Delta | Finished) -> llm_pb2.LlmResponse:
        if isinstance(event, Finished):
            return llm_pb2.LlmResponse(final=llm_pb2.LlmFinal(
                finish_reason=event.finish_reason, prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens, queue_ms=event.queue_ms, prefill_ms=event.prefill_ms,
                ttft_ms=event.ttft_ms, decode_batch=event.decode_batch))
        return llm_pb2.LlmResponse(delta=self._delta(event))

    def _delta(self, delta: Delta) -> api_pb2.Delta:
        """The wire delta; each log-probability entry with its token's text and bytes."""
        out = api_pb2.Delta(text=delta.text, token_ids=delta.token_ids)
        for lp in delta.logprobs:
            entry = out.logprobs.add(chosen=self._logprob(lp.token_id, lp.logprob))
            entry.top.extend(self._logprob(token_id, logprob) for token_id, logprob in lp.top)
        return out

    def _logprob(self, token_id: int, logprob: float) -> api_pb2.TokenLogprob:
        text, token_bytes = self.engine.token_texts.get(token_id)
        return api_pb2.TokenLogprob(token_id=token_id, logprob=logprob, text=text, token_bytes=token_bytes)


_STATUSES = ((EngineOverloaded, grpc.StatusCode.RESOURCE_EXHAUSTED), (EmbeddingsEvicted, grpc.StatusCode.NOT_FOUND),
             (StreamClosed, grpc.StatusCode.ABORTED), (transport.TensorUnavailable, grpc.StatusCode.UNAVAILABLE),
             (ValueError, grpc.StatusCode.INVALID_ARGUMENT))  # PromptError and TensorRefError are ValueErrors


async def _abort(context: grpc.aio.ServicerContext, err: Exception) -> None:
    """Ends the call with err's status."""
    code = next(code for kind, code in _STATUSES if isinstance(err, kind))
    if isinstance(err, transport.TensorUnavailable):  # the producer of an embedding went away
        context.set_trailing_metadata(((rpc.INPUT_GONE_HEADER, "1"),))
    await context.abort(code, str(err))
