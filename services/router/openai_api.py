"""OpenAI-compatible HTTP API (chat completions, models, health): a client of the router's own gRPC API."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmserve import auth, rpc, tls
from mmserve.v1 import api_pb2, api_pb2_grpc
from services.router.config import RouterConfig
from services.router.openai_logprobs import logprobs_json
from services.router.openai_protocol import (ApiError, ChatRequest, chunk_json, completion_json, dumps,
                                             error_from_grpc, loopback_address, mmserve_json, parse_chat_body,
                                             served_model_name, sse, usage_json)

log = logging.getLogger(__name__)

ROUTER_SERVICE = api_pb2.DESCRIPTOR.services_by_name["Router"].full_name
# Bodies larger than this are parsed (JSON, base64) in a thread, off the event loop.
PARSE_IN_THREAD_BYTES = 256 * 1024
NO_FINAL = ApiError(500, "router: the stream ended without a final message", type="internal_error")


def error_response(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers=err.headers, dumps=dumps)


def grpc_error_response(err: grpc.aio.AioRpcError) -> web.Response:
    return error_response(error_from_grpc(err.code(), err.details(), err.trailing_metadata()))


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


@web.middleware
async def _json_errors(request: web.Request, handler) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, 413) in the OpenAI shape too."""
    try:
        return await handler(request)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        code = err.reason.lower().replace(" ", "_")
        return error_response(ApiError(err.status, f"{request.method} {request.path}: {err.reason}", code=code))


def too_large(limit: int) -> ApiError:
    """The answer to a body over http_max_body_bytes."""
    return ApiError(413, f"body: larger than {limit} bytes", param="body", code="request_entity_too_large")


def unauthorized(refusal: str) -> ApiError:
    """OpenAI's answer to a missing or wrong API key."""
    return ApiError(401, refusal, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class OpenAiServer:
    """The HTTP endpoint: binds at start-up, then forwards to the router's gRPC server in this process.

    local_target is a private plaintext port of that server (rpc.Service.add_local_port), so the hop works
    whatever the public port speaks; without one, the endpoint dials the public port over loopback (plaintext).
    """

    def __init__(self, config: RouterConfig, local_target: str | None = None):
        self.config = config
        self.local_target = local_target
        # The same tokens as the gRPC API: /v1/models never reaches the router, so the check happens here too.
        self.tokens = auth.shared_checker(config.api_tokens_file)
        self.model_name = served_model_name(config)
        self.created = int(time.time())
        self.channel: grpc.aio.Channel | None = None
        self.router: api_pb2_grpc.RouterStub | None = None
        self.health_stub: health_pb2_grpc.HealthStub | None = None
        self.runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        # aiohttp refuses a body of client_max_size bytes or more while reading it, chunked ones included.
        app = web.Application(client_max_size=self.config.http_body_limit() + 1,
                              middlewares=[_json_errors, self._authorize])
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_get("/health", self.health)
        return app

    async def start(self) -> None:
        """Binds the HTTP port, so a taken port fails start-up; requests get 503 until connect()."""
        # handler_cancellation: a client that goes away cancels its handler, which cancels its gRPC call.
        self.runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None,
                                    shutdown_timeout=self.config.grace_s)
        await self.runner.setup()
        ssl_context = tls.http_ssl_context(self.config)  # HTTPS with the gRPC port's certificate, when it has one
        await web.TCPSite(self.runner, self.config.host, self.config.http_port, ssl_context=ssl_context).start()
        log.info("OpenAI-compatible API on %s://%s:%d/v1 (model %r)", "https" if ssl_context else "http",
                 self.config.host, self.config.http_port, self.model_name)

    def connect(self, grpc_port: int) -> None:
        """Points the endpoint at the router's gRPC server once its port is bound."""
        target = self.local_target or loopback_address(self.config.host, grpc_port)
        self.channel = rpc.insecure_channel(target, self.config.max_message_bytes)
        self.router = api_pb2_grpc.RouterStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        """Stops accepting, lets in-flight requests end within the grace period, closes the channel."""
        if self.runner is not None:
            await self.runner.cleanup()
        if self.channel is not None:
            await self.channel.close()

    @web.middleware
    async def _authorize(self, request: web.Request, handler) -> web.StreamResponse:
        """Every /v1/ route needs a valid bearer token when tokens are configured; /health stays open."""
        if request.path.startswith("/v1/"):
            refusal = self.tokens.headers_refusal(request.headers.getall("Authorization", []))
            if refusal is not None:
                rpc.AUTH_REFUSALS.labels("missing" if refusal == auth.MISSING else "invalid").inc()
                return error_response(unauthorized(refusal))
        return await handler(request)

    async def health(self, request: web.Request) -> web.Response:
        serving = False
        if self.health_stub is not None:
            try:
                reply = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=ROUTER_SERVICE), timeout=5)
                serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                pass
        return web.json_response({"status": "serving" if serving else "not_serving"}, status=200 if serving else 503,
                                 dumps=dumps)

    def _model_json(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "mmserve"}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_json()]}, dumps=dumps)

    async def model(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.model_name:
            return error_response(ApiError(404, f"model: {request.match_info['model']!r} does not exist",
                                           param="model", type="not_found_error", code="model_not_found"))
        return web.json_response(self._model_json(), dumps=dumps)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        request_id = uuid.uuid4().hex
        limit = self.config.http_body_limit()
        try:
            if request.content_length is not None and request.content_length > limit:
                raise too_large(limit)  # refused from the header: the body is never read
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:  # a chunked body (no Content-Length) past the limit
                raise too_large(limit) from None
            parse = functools.partial(parse_chat_body, raw, model_name=self.model_name, request_id=request_id,
                                      max_top_logprobs=self.config.max_top_logprobs)
            chat = await asyncio.to_thread(parse) if len(raw) > PARSE_IN_THREAD_BYTES else parse()
        except ApiError as err:
            return error_response(err)
        if self.router is None:
            return error_response(ApiError(503, "router: not started yet", type="service_unavailable_error",
                                           code="unavailable"))
        auth = request.headers.get("Authorization")
        call = self.router.Generate(chat.grpc_request, metadata=(("authorization", auth),) if auth else None,
                                    timeout=self.config.request_timeout_s)
        try:
            replies = aiter(call)
            try:
                # Headers wait for the first reply, so input the router refuses is an HTTP error, not an SSE event.
                first = await anext(replies)
            except grpc.aio.AioRpcError as err:
                return grpc_error_response(err)
            except StopAsyncIteration:
                return error_response(NO_FINAL)
            chat_id = f"chatcmpl-{request_id}"
            if chat.stream:
                return await self._stream(request, chat, chat_id, _chain(first, replies))
            return await self._complete(chat, chat_id, _chain(first, replies))
        finally:
            call.cancel()  # a no-op when the call ended; otherwise the client left or something raised

    async def _complete(self, chat: ChatRequest, chat_id: str,
                        replies: AsyncIterator[api_pb2.GenerateResponse]) -> web.Response:
        texts, logprobs, final = [], [], None
        try:
            async for reply in replies:
                if reply.WhichOneof("event") == "delta":
                    texts.append(reply.delta.text)
                    logprobs += reply.delta.logprobs
                else:
                    final = reply.final
        except grpc.aio.AioRpcError as err:
            return grpc_error_response(err)
        if final is None:
            return error_response(NO_FINAL)
        answer = completion_json(chat_id, self.model_name, int(time.time()), "".join(texts), final,
                                 logprobs_json(logprobs) if chat.grpc_request.sampling.logprobs else None)
        return web.json_response(answer, dumps=dumps)

    async def _stream(self, request: web.Request, chat: ChatRequest, chat_id: str,
                      replies: AsyncIterator[api_pb2.GenerateResponse]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        created = int(time.time())

        def chunk(delta: dict | None, finish_reason: str | None = None, **extra: Any) -> bytes:
            return sse(chunk_json(chat_id, self.model_name, created, delta, finish_reason, **extra))

        try:
            try:
                await response.write(chunk({"role": "assistant", "content": ""}))
                async for reply in replies:
                    if reply.WhichOneof("event") == "delta":
                        # A token whose text is held back (part of a character) still brings its log-probability.
                        if reply.delta.text or reply.delta.logprobs:
                            await response.write(chunk({"content": reply.delta.text}, logprobs=logprobs_json(
                                reply.delta.logprobs) if reply.delta.logprobs else None))
                        continue
                    final = reply.final
                    await response.write(chunk({}, final.finish_reason or "stop", mmserve=mmserve_json(final)))
                    if chat.include_usage:
                        await response.write(chunk(None, usage=usage_json(final)))
                tail = sse("[DONE]")
            except grpc.aio.AioRpcError as err:  # headers are gone: the error is the last event
                tail = sse(error_from_grpc(err.code(), err.details(), err.trailing_metadata()).body())
            await response.write(tail)
            await response.write_eof()
        except ConnectionResetError:
            log.debug("%s: client went away mid-stream", chat_id)  # the caller cancels the gRPC call
        return response
