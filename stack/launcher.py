"""`mmserve up`: the four services (and a private redis-server) as supervised child processes."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import prometheus_client

from mmserve import rpc, tls
from mmserve.config import ServiceConfig
from stack.ports import free_port, port_is_free, reserve
from stack.secrets import write_secrets
from stack.supervisor import RestartPolicy, Restarts

log = logging.getLogger("mmserve.up")

RESTARTS = prometheus_client.Counter("mmserve_child_restarts", "Children of `mmserve up` restarted after they exited",
                                     ["child"])

_PR_SET_PDEATHSIG = 1
# Every child's unless the environment says otherwise. OpenMP threads (torch's intra-op pool) spin between
# parallel regions by default, taking the cores the other stages need: with streamed prefill the llm's second
# thread burned 10.7 CPU s of a 20 s trace for 4.5 s of work (issue 23). On a host of its own: ACTIVE.
CHILD_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def _die_with_parent() -> None:
    # Children get SIGTERM if `mmserve up` itself dies, even by SIGKILL: no orphans.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclasses.dataclass
class Child:
    name: str
    argv: list[str]
    address: str | None  # gRPC address to health-check, None for redis
    metrics_port: int = 0  # Prometheus endpoint on the same host, 0 when disabled
    process: subprocess.Popen | None = None
    client_tls: tls.ClientTls | None = None  # how the health check reaches it (None: plaintext)
    health_service: str = ""  # the gRPC service its health check asks for ("": the server's overall health)


@dataclasses.dataclass(frozen=True)
class StackSpec:
    """What `mmserve up` starts; the compose file passes the same flags to the same entry points."""

    model: str
    host: str = "127.0.0.1"
    port: int = 50051
    redis_url: str = ""
    media_root: str = ""
    log_level: str = "INFO"
    redis_maxmemory: str = "1gb"
    transport: str = "auto"  # tensor handoff between the stages: auto, shm, remote or inline
    num_encoders: int = 1  # encoder replicas; the router spreads a video's chunks over them
    metrics: bool = False  # give every service a Prometheus endpoint on a free port
    http_port: int = 0  # the router's OpenAI-compatible HTTP API (0: off)
    router_args: tuple[str, ...] = ()  # further router flags, e.g. ("--policy", "fcfs", "--slo-tpot-ms", "100")
    tls_dir: str = ""  # TLS_FILES: TLS on the router's ports, mutual TLS between the services ("": plaintext)
    api_tokens_file: str = ""  # bearer tokens the router's public API requires ("": $MMSERVE_API_TOKENS or open)
    secrets_dir: str = ""  # a private directory for the stack's generated secrets (stack.secrets; "": none generated)
    unified: bool = False  # the encoder and the llm as one unified replica (stack.unified) sharing the device


STARTUP_RECONNECT_MS = 100  # the router's longest pause between connection attempts to a stage

# What `mmserve up --tls-dir` reads (`mmserve.tls.make_dev_certs` writes this layout).
TLS_FILES = ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")


def tls_settings(tls_dir: str) -> tuple[dict[str, str], dict[str, str], tls.ClientTls | None]:
    """Config fields from a TLS directory: for the internal services (mTLS), for the router (TLS on its public
    port, a client certificate towards the stages), and how a health check reaches them all."""
    if not tls_dir:
        return {}, {}, None
    path = {name: os.path.join(tls_dir, name) for name in TLS_FILES}
    served = dict(tls_cert_file=path["server.pem"], tls_key_file=path["server.key"])
    calling = dict(tls_ca_file=path["ca.pem"], tls_client_cert_file=path["client.pem"],
                   tls_client_key_file=path["client.key"])  # stages call each other too (remote tensor pulls)
    internal = dict(served, tls_client_ca_file=path["ca.pem"], **calling)
    router = dict(served, **calling)
    return internal, router, tls.ClientTls(path["ca.pem"], path["client.pem"], path["client.key"])


def tls_dir_error(tls_dir: str) -> str | None:
    """Why a TLS directory cannot serve the stack (files missing), or None."""
    missing = [name for name in TLS_FILES if tls_dir and not os.path.isfile(os.path.join(tls_dir, name))]
    if missing:
        return (f"--tls-dir {tls_dir}: missing {', '.join(missing)} (`mmserve certs --out {tls_dir}` writes a "
                "development set)")
    return None


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `mmserve up` runs: the services as (stage, config) pairs in start order (router last), and a private
    redis-server unless the spec names a Redis."""

    services: list[tuple[str, ServiceConfig]]
    redis_argv: list[str] | None
    client_tls: tls.ClientTls | None  # how a health check reaches the services (None: plaintext)
    router_address: str
    is_unified: bool = False  # the encoder and the llm run as one `stack.unified` process

    def children(self) -> list[Child]:
        """The processes that run the plan: redis-server, then `python -m services.<stage>` per service."""
        children = [Child("redis", self.redis_argv, None)] if self.redis_argv else []
        for stage, config in self.services:
            if self.is_unified and stage in ("encoder", "llm"):
                if stage == "llm":  # after its encoder: one process serving both configs
                    children.append(unified_child(dict(self.services)["encoder"], config, self.client_tls))
                continue
            peers = [c for s, c in self.services if s == stage]
            name = stage if len(peers) == 1 else f"{stage}-{peers.index(config)}"
            children.append(Child(name, [sys.executable, "-m", f"services.{stage}", *config.to_argv()],
                                  f"{config.host}:{config.port}", config.metrics_port, client_tls=self.client_tls,
                                  health_service=rpc.STAGE_SERVICES[stage]))
        return children


def plan(spec: StackSpec) -> Plan:
    """The services' configs, the private redis-server and the router address."""
    from services.decoder.config import DecoderConfig
    from services.encoder.config import EncoderConfig
    from services.llm.config import LlmConfig
    from services.router.config import RouterConfig

    host = spec.host
    internal_tls, router_tls, client_tls = tls_settings(spec.tls_dir)
    reserve(host, spec.port, spec.http_port)  # the router's: none of ours
    ports = {"decoder": [free_port(host)], "encoder": [free_port(host) for _ in range(spec.num_encoders)],
             "llm": [free_port(host)]}
    secrets = write_secrets(spec.secrets_dir) if spec.secrets_dir else {}
    credentials = dict(internal_token_file=secrets["internal-token"]) if secrets else {}
    redis_url, redis_argv = spec.redis_url, None
    if not redis_url:
        redis_port = free_port(host)
        redis_url = f"redis://{host}:{redis_port}/0"
        if secrets:  # the private redis-server gets the password (an external one keeps its own settings)
            credentials["redis_password_file"] = secrets["redis-password"]
        redis_argv = redis_server_argv(redis_server_binary(), host, redis_port, maxmemory=spec.redis_maxmemory,
                                       workdir=tempfile.gettempdir(), config_file=secrets.get("redis.conf", ""))

    def common() -> dict:
        return dict(host=host, log_level=spec.log_level, transport=spec.transport,
                    metrics_port=free_port(host) if spec.metrics else 0, **credentials)

    def addresses(stage: str) -> str:
        return ",".join(f"{host}:{port}" for port in ports[stage])

    services = [("decoder", DecoderConfig(port=ports["decoder"][0], model=spec.model, media_root=spec.media_root,
                                          **common(), **internal_tls))]
    services += [("encoder", EncoderConfig(port=port, model=spec.model, redis_url=redis_url, **common(),
                                           **internal_tls))
                 for port in ports["encoder"]]
    services.append(("llm", LlmConfig(port=ports["llm"][0], model=spec.model, redis_url=redis_url, **common(),
                                      **internal_tls)))
    stages = (dict(unified_addrs=f"{addresses('encoder')}/{addresses('llm')}") if spec.unified
              else dict(encoder_addrs=addresses("encoder"), llm_addrs=addresses("llm")))
    router = RouterConfig(
        port=spec.port, model=spec.model, redis_url=redis_url, media_root=spec.media_root,
        decoder_addrs=addresses("decoder"), **stages,
        http_port=spec.http_port, api_tokens_file=spec.api_tokens_file,
        # Every stage starts with the router: it should see each one serving within a moment, not the default
        # reconnect backoff (up to 2 s) later (see rpc.STARTUP_RECONNECT_OPTIONS).
        replica_reconnect_max_ms=STARTUP_RECONNECT_MS, **common(), **router_tls)
    services.append(("router", router.with_flags(list(spec.router_args))))
    return Plan(services, redis_argv, client_tls, f"{host}:{spec.port}", is_unified=spec.unified)


def unified_child(encoder, llm, client_tls) -> Child:
    """One `python -m stack.unified` process serving the encoder's and the llm's configs over one device."""
    argv = [sys.executable, "-m", "stack.unified", "--encoder-args", shlex.join(encoder.to_argv()),
            "--llm-args", shlex.join(llm.to_argv())]
    return Child("unified", argv, f"{llm.host}:{llm.port}", llm.metrics_port, client_tls=client_tls,
                 health_service=rpc.STAGE_SERVICES["llm"])


def redis_server_argv(binary: str, host: str, port: int, *, maxmemory: str, workdir: str,
                      config_file: str = "") -> list[str]:
    """A private, memory-bounded, non-persistent redis-server: the embedding cache evicts, never fills up;
    config_file (its password) comes first, as redis-server wants it."""
    return [binary, *([config_file] if config_file else []), "--port", str(port), "--bind", host, "--save", "",
            "--appendonly", "no", "--loglevel", "warning", "--maxmemory", maxmemory, "--maxmemory-policy",
            "allkeys-lru", "--dir", workdir]


def redis_server_binary() -> str:
    """The redis-server on PATH; exits with advice when there is none."""
    path = shutil.which("redis-server")
    if path is None:
        raise SystemExit("mmserve up: redis-server not found; install it (apt-get install redis-server) "
                         "or pass --redis-url")
    return path


class Stack:
    """Starts children, waits until healthy, restarts those that exit, stops them all (SIGTERM, then SIGKILL after a
    grace period)."""

    def __init__(self, children: list[Child], grace_s: float = 10.0):
        self.children = children
        self.grace_s = grace_s

    def start(self) -> None:
        for child in self.children:
            self.start_child(child)

    def start_child(self, child: Child) -> None:
        """Starts one child (again) with its argv: same ports, same flags."""
        # Called on the loop's thread: PR_SET_PDEATHSIG fires when the thread that forked exits, not the process.
        # Children log to stderr: stdout carries only the "listening" line scripts wait for.
        child.process = subprocess.Popen(child.argv, preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL,
                                         stdout=sys.stderr, env=CHILD_ENV_DEFAULTS | os.environ)
        metrics = f", metrics on :{child.metrics_port}/metrics" if child.metrics_port else ""
        log.info("started %s (pid %d)%s", child.name, child.process.pid, metrics)

    async def wait_healthy(self, timeout_s: float) -> None:
        """Returns once every gRPC child reports SERVING; raises if one exits or the time runs out."""
        all_healthy = asyncio.gather(*(rpc.wait_healthy(c.address, timeout_s, c.health_service, c.client_tls)
                                       for c in self.children if c.address))
        exited = asyncio.create_task(self.wait_any_exit())
        try:
            done, _ = await asyncio.wait([exited, all_healthy], return_when=asyncio.FIRST_COMPLETED)
            if exited in done:
                name = exited.result()
                code = next(c.process.wait() for c in self.children if c.name == name)
                raise RuntimeError(f"{name} exited during start-up ({_how(code)})")
            all_healthy.result()  # a health check's TimeoutError surfaces here
        finally:
            exited.cancel()
            all_healthy.cancel()
            # Retrieve both outcomes, so a cancelled gather never logs "exception was never retrieved".
            await asyncio.gather(exited, all_healthy, return_exceptions=True)

    async def wait_any_exit(self) -> str:
        """The name of the first child that exits."""
        waits = {asyncio.ensure_future(self.wait_exit(c)): c.name for c in self.children}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            return waits[done.pop()]
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    @staticmethod
    async def wait_exit(child: Child) -> int:
        """The child's exit code once it exits (a pidfd wakes the loop; no thread, no polling)."""
        try:
            fd = os.pidfd_open(child.process.pid)
        except ProcessLookupError:  # already reaped
            return child.process.wait()
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
        try:
            await exited
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        return child.process.wait()  # reaps it at once

    async def supervise(self, policy: RestartPolicy) -> str:
        """Restarts every child that exits, after its backoff; returns the name of the first that crash-loops."""
        keepers = [asyncio.ensure_future(self._keep_running(c, Restarts(policy, time.monotonic())))
                   for c in self.children]
        try:
            done, _ = await asyncio.wait(keepers, return_when=asyncio.FIRST_COMPLETED)
            return done.pop().result()
        finally:
            for task in keepers:
                task.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)

    async def _keep_running(self, child: Child, restarts: Restarts) -> str:
        while True:
            code = await self.wait_exit(child)
            delay = restarts.on_exit(time.monotonic())
            if delay is None:
                log.error("%s exited (%s) after %d restarts within %.0f s; giving up", child.name, _how(code),
                          restarts.num_restarts, restarts.policy.window_s)
                return child.name
            log.warning("%s exited (%s); restarting it in %.1f s", child.name, _how(code), delay)
            await asyncio.sleep(delay)
            self.start_child(child)
            restarts.on_restart(time.monotonic())
            RESTARTS.labels(child.name).inc()
            log.warning("%s restarted (restart %d)", child.name, restarts.num_restarts)

    def stop(self) -> None:
        """SIGTERM to every child (router first), SIGKILL to any still alive after the grace period."""
        alive = [c.process for c in reversed(self.children) if c.process and c.process.poll() is None]
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in alive:
            try:
                p.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _how(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit code {code}"


def port_in_use_error(spec: StackSpec) -> str | None:
    """Why the stack cannot start on its public ports (taken), or None."""
    if not port_is_free(spec.host, spec.port):
        return f"port {spec.port} on {spec.host} is already in use (pick another with --port)"
    if spec.http_port and not port_is_free(spec.host, spec.http_port):
        return f"HTTP port {spec.http_port} on {spec.host} is already in use (pick another with --http-port)"
    return None


async def run_stack(spec: StackSpec, ready_timeout_s: float = 300.0, policy: RestartPolicy = RestartPolicy()) -> int:
    """Runs the stack until SIGINT/SIGTERM (exit code 0), restarting children that exit, or until one crash-loops
    (exit code 1)."""
    if (error := port_in_use_error(spec) or tls_dir_error(spec.tls_dir)) is not None:
        print(f"mmserve up: {error}", file=sys.stderr)
        return 2
    try:
        planned = plan(spec)
    except ValueError as err:  # a TLS directory without its files, a setting out of range
        print(f"mmserve up: {err}", file=sys.stderr)
        return 2
    stack, router = Stack(planned.children()), planned.router_address
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        stack.start()
        starting = asyncio.create_task(stack.wait_healthy(ready_timeout_s))
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if stopping in done:
            starting.cancel()
            return 0
        starting.result()
        if spec.metrics:  # logged before the "listening" line, so a script that waits for that line finds it
            port = free_port(spec.host)
            prometheus_client.start_http_server(port, addr=spec.host)  # mmserve_child_restarts_total{child}
            print(f"mmserve: launcher metrics on http://{spec.host}:{port}/metrics", file=sys.stderr, flush=True)
        print(f"mmserve: router listening on {router}", flush=True)
        if spec.http_port:
            scheme = "https" if spec.tls_dir else "http"
            print(f"mmserve: OpenAI-compatible API on {scheme}://{spec.host}:{spec.http_port}/v1", file=sys.stderr,
                  flush=True)
        supervising = asyncio.create_task(stack.supervise(policy))
        done, _ = await asyncio.wait([supervising, stopping], return_when=asyncio.FIRST_COMPLETED)
        if supervising in done:
            print(f"mmserve up: {supervising.result()} keeps exiting (crash loop); stopping", file=sys.stderr)
            code = 1
        else:  # SIGINT/SIGTERM: nothing is restarted once the children are being stopped
            supervising.cancel()
            await asyncio.gather(supervising, return_exceptions=True)
    except (RuntimeError, TimeoutError) as err:
        print(f"mmserve up: {err}", file=sys.stderr)
        code = 1
    finally:
        await asyncio.to_thread(stack.stop)
    return code


def main_up(spec: StackSpec) -> int:
    """Entry point of `mmserve up`."""
    rpc.setup_logging(spec.log_level)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return asyncio.run(run_stack(spec))
