"""The Llm gRPC servicer: protobuf in (embeddings by ref or by cache key), engine events out."""

from __future__ import annotations

import asyncio

import grpc

from mmserve import rpc, transport
from mmserve.cache import EmbeddingCache, join_chunks
from mmserve.models.family import unpack
from mmserve.sampling import sampling_from_proto
from mmserve.v1 import api_pb2, decoder_pb2, llm_pb2, llm_pb2_grpc
from services.llm.engine import Delta, Engine, EngineOverloaded, Finished
from services.llm.prompt import ChatMessage, MediaInput, PromptError

_KINDS = {decoder_pb2.MEDIA_KIND_IMAGE: "image", decoder_pb2.MEDIA_KIND_VIDEO: "video"}
_ROLES = ("system", "user", "assistant")


class EmbeddingsEvicted(Exception):
    """A cache key the router sent has no entry (any more): NOT_FOUND, and the router computes it again."""


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


def messages_from_proto(messages, embeddings: list, hidden_size: int) -> list[ChatMessage]:
    """Internal chat messages, the media parts taking embeddings (packed tensors, in prompt order, split into the
    embeddings and their DeepStack layers of hidden_size columns each)."""
    tensors = iter(embeddings)
    out = []
    for i, m in enumerate(messages):
        parts: list[str | MediaInput] = []
        for part in m.parts:
            if part.WhichOneof("content") == "text":
                parts.append(part.text)
                continue
            media, tensor = part.media, next(tensors)
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
            options = sampling_from_proto(request.sampling)
            messages = await self._messages(request, context)
            resolving = False
            priority = request.priority or float("inf")
            seq = await asyncio.to_thread(self.engine.prepare, request.request_id, messages, options, priority)
            events = self.engine.generate(seq)
            async for event in events:
                if isinstance(event, Finished):
                    yield llm_pb2.LlmResponse(final=llm_pb2.LlmFinal(
                        finish_reason=event.finish_reason, prompt_tokens=event.prompt_tokens,
                        completion_tokens=event.completion_tokens, queue_ms=event.queue_ms,
                        prefill_ms=event.prefill_ms, ttft_ms=event.ttft_ms,
                        decode_batch=event.decode_batch))
                else:
                    yield llm_pb2.LlmResponse(delta=self._delta(event))
        except (ValueError, PromptError, transport.TensorRefError) as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except EngineOverloaded as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except transport.TensorUnavailable as err:  # the producer of an embedding went away
            context.set_trailing_metadata(((rpc.INPUT_GONE_HEADER, "1"),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        except EmbeddingsEvicted as err:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        finally:
            if resolving:  # refused or cancelled before the embeddings were taken: free the producers' leases
                await transport.release([p.media.embeddings for m in request.messages for p in m.parts
                                         if p.WhichOneof("content") == "media"])

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
