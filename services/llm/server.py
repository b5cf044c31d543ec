"""The Llm gRPC servicer: protobuf in, engine events out."""

from __future__ import annotations

import asyncio

import grpc

from mmserve import transport
from mmserve.sampling import sampling_from_proto
from mmserve.v1 import api_pb2, decoder_pb2, llm_pb2, llm_pb2_grpc
from services.llm.engine import Engine, EngineOverloaded, Finished
from services.llm.prompt import ChatMessage, MediaInput, PromptError

_KINDS = {decoder_pb2.MEDIA_KIND_IMAGE: "image", decoder_pb2.MEDIA_KIND_VIDEO: "video"}
_ROLES = ("system", "user", "assistant")


def messages_from_proto(messages) -> list[ChatMessage]:
    """Internal chat messages with media embeddings materialised."""
    out = []
    for i, m in enumerate(messages):
        if m.role not in _ROLES:
            raise ValueError(f"messages[{i}].role: unknown role {m.role!r}")
        parts: list[str | MediaInput] = []
        for part in m.parts:
            if part.WhichOneof("content") == "text":
                parts.append(part.text)
                continue
            media = part.media
            if media.kind not in _KINDS or len(media.grid_thw) != 3:
                raise ValueError(f"messages[{i}]: media without a kind or a (t, h, w) grid")
            parts.append(MediaInput(_KINDS[media.kind], transport.from_ref(media.embeddings),
                                    tuple(media.grid_thw), media.second_per_grid_t))
        out.append(ChatMessage(m.role, parts))
    return out


class LlmServicer(llm_pb2_grpc.LlmServicer):
    def __init__(self, engine: Engine):
        self.engine = engine

    async def Generate(self, request: llm_pb2.LlmRequest, context: grpc.aio.ServicerContext):
        try:
            options = sampling_from_proto(request.sampling)
            messages = messages_from_proto(request.messages)
            priority = request.priority or float("inf")
            seq = await asyncio.to_thread(self.engine.prepare, request.request_id, messages, options, priority)
            events = self.engine.generate(seq)
            async for event in events:
                if isinstance(event, Finished):
                    yield llm_pb2.LlmResponse(final=llm_pb2.LlmFinal(
                        finish_reason=event.finish_reason, prompt_tokens=event.prompt_tokens,
                        completion_tokens=event.completion_tokens, queue_ms=event.queue_ms,
                        prefill_ms=event.prefill_ms, ttft_ms=event.ttft_ms))
                else:
                    yield llm_pb2.LlmResponse(delta=api_pb2.Delta(text=event.text, token_ids=event.token_ids))
        except (ValueError, PromptError, transport.TensorRefError) as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except EngineOverloaded as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except transport.TensorUnavailable as err:  # the producer of an embedding went away
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
