"""gRPC plumbing every service shares: server start-up, health, reflection, channels, shutdown."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mmserve import registry, transport
from mmserve.config import ServiceConfig

log = logging.getLogger(__name__)


def message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options raising gRPC's 4 MB default message cap to ours."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def insecure_channel(address: str, max_message_bytes: int) -> grpc.aio.Channel:
    """An asyncio channel to another service with our message size cap."""
    return grpc.aio.insecure_channel(address, options=message_options(max_message_bytes))


# The request a log line belongs to: set for every RPC from its request's `request_id` field.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def setup_logging(level: str) -> None:
    """Logs to stderr as `time level logger [request id]: message`, so one request can be followed."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


class RequestContextInterceptor(grpc.aio.ServerInterceptor):
    """Sets the RPC's context: the caller's shared-memory domain (transport.caller_domain) and request id."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        caller = dict(details.invocation_metadata or ()).get(transport.CALLER_DOMAIN_HEADER, "")
        if handler is None:
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_in_context(handler.unary_unary, caller))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_in_context(handler.unary_stream, caller))
        return handler


def _enter(request, caller: str) -> None:
    # Each RPC runs in its own task and context, so these never leak into another request.
    if caller:
        transport.caller_domain.set(caller)
    request_id.set(getattr(request, "request_id", "") or "-")


def _in_context(behavior, caller: str):
    if inspect.isasyncgenfunction(behavior):
        async def stream(request, context):
            _enter(request, caller)
            async for reply in behavior(request, context):
                yield reply
        return stream

    async def unary(request, context):
        _enter(request, caller)
        return await behavior(request, context)
    return unary


class Service:
    """One running gRPC server with the health service, reflection, and the process's tensor store."""

    def __init__(self, config: ServiceConfig, service_names: Iterable[str]):
        self.config = config
        self.server = grpc.aio.server(
            # No SO_REUSEPORT: a second server on a taken port must fail, not silently share it.
            options=[*message_options(config.max_message_bytes), ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            interceptors=[RequestContextInterceptor()],
        )
        self.store = transport.TensorStore(config.transport, config.inline_limit_bytes, config.lease_s)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = list(service_names)
        reflection.enable_server_reflection([*self.service_names, reflection.SERVICE_NAME, health.SERVICE_NAME],
                                            self.server)
        self.port = 0
        self.registration: registry.Registration | None = None

    async def start(self) -> int:
        """Binds, starts and marks every service SERVING; returns the bound port."""
        self.port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {self.config.host}:{self.config.port}")
        if self.config.metrics_port:
            import prometheus_client

            prometheus_client.start_http_server(self.config.metrics_port, addr=self.config.host)
        # Consumers on other hosts pull our remote refs from this server's TensorStore service.
        transport.serve(self.store, self.server, registry.advertised_address(
            self.config.host, self.port, self.config.advertise_address))
        await self.server.start()
        self.store.start()
        transport.install_store(self.store)
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.registry_url:
            stage = self.service_names[0].rsplit(".", 1)[-1].lower()
            address = registry.advertised_address(self.config.host, self.port, self.config.advertise_address)
            self.registration = registry.Registration(self.config.registry_url, stage, address)
            self.registration.start()
        log.info("serving %s on %s:%d", ",".join(self.service_names), self.config.host, self.port)
        return self.port

    async def stop(self) -> None:
        """Leaves the registry, reports NOT_SERVING, lets in-flight RPCs finish within the grace period, stops."""
        if self.registration is not None:
            await self.registration.stop()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_s)
        if transport.current_store() is self.store:
            transport.install_store(None)
        self.store.close()  # unlinks every segment no consumer claimed


async def run_until_signalled(service: Service, on_stop: Callable[[], Awaitable[None]] | None = None,
                              on_start: Callable[[int], None] | None = None) -> None:
    """Serves until SIGTERM or SIGINT, then shuts down gracefully; on_start gets the bound port."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = await service.start()
    if on_start is not None:
        on_start(port)
    try:
        await stop.wait()
    finally:
        await service.stop()
        if on_stop is not None:
            await on_stop()


async def wait_healthy(address: str, timeout_s: float, service: str = "") -> None:
    """Blocks until the server at address reports SERVING, or raises TimeoutError."""
    async with grpc.aio.insecure_channel(address) as channel:
        async with asyncio.timeout(timeout_s):
            await channel.channel_ready()
            stub = health_pb2_grpc.HealthStub(channel)
            # Watch streams status changes, so nothing polls.
            async for reply in stub.Watch(health_pb2.HealthCheckRequest(service=service)):
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
    raise ConnectionError(f"{address}: health stream ended before SERVING")
