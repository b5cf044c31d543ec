"""gRPC plumbing every service shares: server start-up, health, reflection, channels, shutdown."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable, Iterable

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mmserve import auth, internal_token, registry, request_ids, tls, transport
from mmserve.config import AuthOptions, ServiceConfig
from mmserve.v1 import api_pb2, decoder_pb2, encoder_pb2, llm_pb2

log = logging.getLogger(__name__)


def message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options raising gRPC's 4 MB default message cap to ours."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def insecure_channel(address: str, max_message_bytes: int, options: Iterable[tuple[str, int]] = ()) -> grpc.aio.Channel:
    """An asyncio channel to another service with our message size cap (and further channel options); its calls
    carry the process's internal token, if one is installed."""
    return grpc.aio.insecure_channel(address, options=[*message_options(max_message_bytes), *options],
                                     interceptors=internal_token.client_interceptors())


def channel(address: str, max_message_bytes: int, client_tls: tls.ClientTls | None = None,
            options: Iterable[tuple[str, int]] = ()) -> grpc.aio.Channel:
    """An asyncio channel to another service: TLS (mutual when client_tls has a certificate), else plaintext."""
    if client_tls is None:
        return insecure_channel(address, max_message_bytes, options)
    return grpc.aio.secure_channel(address, client_tls.credentials(),
                                   options=[*message_options(max_message_bytes), *client_tls.options(), *options],
                                   interceptors=internal_token.client_interceptors())


def install_credentials(config: ServiceConfig) -> str | None:
    """Makes the config's client TLS and internal token what this process's channels to other services use (files
    are read now, so a bad setting fails start-up with a message naming it); returns the internal token, if any."""
    tls.install_client(tls.client_tls(config))
    internal_token.install(token := internal_token.load(config.internal_token_file))
    return token


# Trailing metadata of an UNAVAILABLE that blames the request's input tensors (their producer went away),
# not the replica answering: the caller computes the input again instead of withdrawing a healthy replica.
INPUT_GONE_HEADER = "mmserve-input-gone"


def is_input_gone(err: grpc.aio.AioRpcError) -> bool:
    """Whether a failed call's replica is fine and only the request's input tensors are gone."""
    return any(key == INPUT_GONE_HEADER for key, _ in (err.trailing_metadata() or ()))


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


def lower_priority(nice: int) -> None:
    """Adds nice to the niceness of every thread of this process (Linux keeps one per thread, and libraries start
    some at import: OpenBLAS's pool); the threads and processes it starts later inherit it (OpenMP's, gRPC's, the
    decoder's workers)."""
    if not nice:
        return
    if not os.path.isdir("/proc/self/task"):  # not Linux: the calling thread's is the process's
        os.nice(nice)
        return
    for tid in map(int, os.listdir("/proc/self/task")):
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))


class RequestContextInterceptor(grpc.aio.ServerInterceptor):
    """Sets the RPC's context: the caller's shared-memory domain (transport.caller_domain) and request id."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        caller = dict(details.invocation_metadata or ()).get(transport.CALLER_DOMAIN_HEADER, "")
        if handler is None:
            return handler
        if handler.unary_unary is None and handler.unary_stream is None:
            return handler  # set for calls of one request message only, whose request id it reads

        async def enter(request, context) -> None:
            # Each RPC runs in its own task and context, so these never leak into another request.
            if caller:
                transport.caller_domain.set(caller)
            request_id.set(request_ids.for_log(getattr(request, "request_id", "")))

        kind = _kind(handler)
        return handler._replace(**{kind: _around(getattr(handler, kind), enter)})


AUTH_REFUSALS = prometheus_client.Counter("mmserve_auth_refusals", "Requests refused for a missing or invalid "
                                          "bearer token", ["reason"])


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on the methods of the given services (health, reflection stay open)."""

    def __init__(self, checker: auth.TokenChecker, services: Iterable[str]):
        self.checker = checker
        self.prefixes = tuple(f"/{name}/" for name in services)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefixes):
            return handler
        values = [value for key, value in details.invocation_metadata or () if key == "authorization"]
        refusal = self.checker.headers_refusal(values)
        if refusal is None:
            return handler
        AUTH_REFUSALS.labels("missing" if refusal == auth.MISSING else "invalid").inc()
        return _refusing(handler, refusal)


class InternalTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires the stack's internal token (internal_token.HEADER) on every method but those of the open services."""

    def __init__(self, token: str, open_services: Iterable[str]):
        self.checker = auth.TokenChecker({token})
        self.open_prefixes = tuple(f"/{name}/" for name in open_services)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.open_prefixes):
            return handler
        refusal = internal_token.refusal(self.checker, details.invocation_metadata)
        if refusal is None:
            return handler
        AUTH_REFUSALS.labels("internal").inc()
        return _refusing(handler, refusal)


def _kind(handler: grpc.RpcMethodHandler) -> str:
    """Which of a handler's four behaviours it has: unary_unary, unary_stream, stream_unary or stream_stream."""
    return next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
                if getattr(handler, k) is not None)


def _around(behavior, enter, leave=None):
    """behavior with `await enter(request, context)` before it and leave() once it has ended however it ends (not when
    enter raised); a streaming behaviour stays an async generator."""
    if inspect.isasyncgenfunction(behavior):
        async def stream(request, context):
            await enter(request, context)
            try:
                async for reply in behavior(request, context):
                    yield reply
            finally:
                if leave is not None:
                    leave()
        return stream

    async def call(request, context):
        await enter(request, context)
        try:
            return await behavior(request, context)
        finally:
            if leave is not None:
                leave()
    return call


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """The handler with its behaviour replaced by an UNAUTHENTICATED answer (its (de)serializers are kept)."""
    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as streaming handlers are

    kind = _kind(handler)
    return handler._replace(**{kind: refuse_stream if kind.endswith("_stream") else refuse})


# Trailing metadata of a RESOURCE_EXHAUSTED: milliseconds after which a retry may succeed.
RETRY_AFTER_HEADER = "retry-after-ms"
# What a server at its RPC limit asks callers to wait: a transport-level refusal knows no queue to price.
BUSY_RETRY_AFTER_MS = 1000

BUSY_REFUSALS = prometheus_client.Counter("mmserve_busy_refusals", "Calls refused at the server's limit of RPCs in "
                                          "flight (max_concurrent_rpcs)")


class ConcurrencyLimitInterceptor(grpc.aio.ServerInterceptor):
    """At most `limit` calls of the service's own methods at once; one more is answered RESOURCE_EXHAUSTED with
    retry-after-ms. gRPC's own maximum_concurrent_rpcs answers with neither a hint nor the limit's name, and counts
    health checks with the rest: a replica at its limit then looked dead to the router and the launcher watching it.
    Health and reflection are neither counted nor refused here."""

    def __init__(self, limit: int, open_services: Iterable[str]):
        self.limit = limit
        self.open_prefixes = tuple(f"/{name}/" for name in open_services)
        self.num_in_flight = 0

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.open_prefixes):
            return handler
        kind = _kind(handler)
        return handler._replace(**{kind: _around(getattr(handler, kind), self._enter, self._leave)})

    async def _enter(self, request, context) -> None:
        if self.num_in_flight >= self.limit:
            BUSY_REFUSALS.inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"server busy: {self.limit} calls in flight, its limit (max_concurrent_rpcs); "
                                f"retry after {BUSY_RETRY_AFTER_MS} ms",
                                trailing_metadata=((RETRY_AFTER_HEADER, str(BUSY_RETRY_AFTER_MS)),))
        self.num_in_flight += 1

    def _leave(self) -> None:
        self.num_in_flight -= 1


class Service:
    """One running gRPC server with the health service, reflection, and the process's tensor store."""

    def __init__(self, config: ServiceConfig, service_names: Iterable[str], *, holds_tensors: bool = True):
        self.config = config
        self.service_names = list(service_names)
        # Innermost: a call refused for its credentials never takes one of the limit's places.
        interceptors: list[grpc.aio.ServerInterceptor] = [
            RequestContextInterceptor(),
            ConcurrencyLimitInterceptor(config.max_concurrent_rpcs, [health.SERVICE_NAME, reflection.SERVICE_NAME])]
        # Files are read now, so bad TLS or token settings fail start-up with a message naming the setting.
        self.credentials = tls.server_credentials(config)
        token = install_credentials(config)
        is_public = isinstance(config, AuthOptions)
        if is_public:  # installed even without tokens: a reload (SIGHUP) may bring some
            interceptors.insert(0, BearerTokenInterceptor(auth.shared_checker(config.api_tokens_file),
                                                          self.service_names))
        if token is not None:
            # Health stays open everywhere; on a public port its own API (API tokens) and reflection too, while its
            # TensorStore, like every method of a stage (reflection included), takes the internal token only.
            public = [*self.service_names, reflection.SERVICE_NAME] if is_public else []
            open_services = [health.SERVICE_NAME, *public]
            interceptors.insert(0, InternalTokenInterceptor(token, open_services))
        self.server = grpc.aio.server(
            # No SO_REUSEPORT: a second server on a taken port must fail, not silently share it.
            options=[*message_options(config.max_message_bytes), ("grpc.so_reuseport", 0),
                     # The router pings its replicas every second to notice a stalled one (RouterConfig);
                     # gRPC's default answers pings more frequent than 5 minutes with GOAWAY too_many_pings.
                     ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
                     ("grpc.http2.min_ping_interval_without_data_ms", 500), ("grpc.keepalive_permit_without_calls", 1)],
            interceptors=interceptors,
        )
        # A service that only moves handles (the router) holds no tensors: no store, and no torch in the process.
        self.store = (transport.TensorStore(config.transport, config.inline_limit_bytes, config.lease_s)
                      if holds_tensors else None)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([*self.service_names, reflection.SERVICE_NAME, health.SERVICE_NAME],
                                            self.server)
        self.port = 0
        self.registration: registry.Registration | None = None
        # What it registers as with --registry-url: its stage (None: nothing), and a prefix of its address (a unified
        # replica registers once, as "unified" with "<encoder address>/" before its llm's address).
        self.registry_stage: str | None = self.service_names[0].rsplit(".", 1)[-1].lower()
        self.registry_prefix = ""
        self.local_dir: str | None = None

    def add_local_port(self) -> str:
        """Also serves on a unix socket in a private directory, for clients inside this process (the HTTP front
        end): plaintext whatever the TCP port speaks, reachable by this user only; returns the channel target."""
        self.local_dir = tempfile.mkdtemp(prefix="mmserve-")  # mode 0700
        target = f"unix:{os.path.join(self.local_dir, 'grpc.sock')}"
        self.server.add_insecure_port(target)
        return target

    async def start(self) -> int:
        """Binds, starts and marks every service SERVING; returns the bound port."""
        address = f"{self.config.host}:{self.config.port}"
        if self.credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, self.credentials)
        if self.port == 0:
            raise OSError(f"cannot bind {self.config.host}:{self.config.port}")
        if self.config.metrics_port:
            import prometheus_client

            prometheus_client.start_http_server(self.config.metrics_port, addr=self.config.host)
        if self.store is not None:  # consumers on other hosts pull our remote refs from its TensorStore service
            transport.serve(self.store, self.server, registry.advertised_address(
                self.config.host, self.port, self.config.advertise_address))
        await self.server.start()
        if self.store is not None:
            self.store.start()
            transport.install_store(self.store)
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.registry_url and self.registry_stage:
            address = registry.advertised_address(self.config.host, self.port, self.config.advertise_address)
            self.registration = registry.Registration(self.config.registry_url, self.registry_stage,
                                                      self.registry_prefix + address,
                                                      password=registry.redis_password(self.config))
            self.registration.start()
        log.info("serving %s on %s:%d", ",".join(self.service_names), self.config.host, self.port)
        return self.port

    async def stop(self) -> None:
        """Leaves the registry, reports NOT_SERVING, lets in-flight RPCs finish within the grace period, stops."""
        if self.registration is not None:
            await self.registration.stop()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_s)
        if self.store is not None:
            if transport.current_store() is self.store:
                transport.install_store(None)
            self.store.close()  # unlinks every segment no consumer claimed
        if self.local_dir is not None:
            shutil.rmtree(self.local_dir, ignore_errors=True)


async def run_until_signalled(service: Service, on_stop: Callable[[], Awaitable[None]] | None = None,
                              on_start: Callable[[int], None] | None = None) -> None:
    """Serves until SIGTERM or SIGINT, then shuts down gracefully; on_start gets the bound port."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, auth.reload_tokens)  # token rotation without a restart
    port = await service.start()
    if on_start is not None:
        on_start(port)
    try:
        await stop.wait()
    finally:
        await service.stop()
        if on_stop is not None:
            await on_stop()


# A server that is still starting refuses connections; gRPC's default backoff (1 s growing 1.6x, up to 2 min) would
# notice it seconds after it listens. A refused connection attempt every 100 ms costs next to nothing. (Not
# grpc.min_reconnect_backoff_ms: that is the time a connection, TLS handshake included, is given to succeed.)
STARTUP_RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 100))


# The gRPC service each kind of process serves. Its health is reported under this name as well as under "", and
# health checks ask for it: an address that reaches another stage's process (a port given twice, a flag pointing
# at the wrong stage) never looks healthy for this one.
STAGE_SERVICES = {stage: module.DESCRIPTOR.services_by_name[name].full_name for stage, module, name in (
    ("decoder", decoder_pb2, "Decoder"), ("encoder", encoder_pb2, "Encoder"), ("llm", llm_pb2, "Llm"),
    ("router", api_pb2, "Router"))}


async def wait_healthy(address: str, timeout_s: float, service: str = "",
                       client_tls: tls.ClientTls | None = None) -> None:
    """Blocks until the server at address reports SERVING, or raises TimeoutError."""
    async with channel(address, 4 * 1024 * 1024, client_tls, STARTUP_RECONNECT_OPTIONS) as health_channel:
        async with asyncio.timeout(timeout_s):
            await health_channel.channel_ready()
            stub = health_pb2_grpc.HealthStub(health_channel)
            # Watch streams status changes, so nothing polls.
            async for reply in stub.Watch(health_pb2.HealthCheckRequest(service=service)):
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
    raise ConnectionError(f"{address}: health stream ended before SERVING")
