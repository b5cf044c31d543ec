"""`mmserve up --aggregated`: the decoder, encoder, llm and router in ONE process and one event loop.

Each stage is built by the same function its own process uses (`services.<role>.__main__.build_<role>`) and
serves on its own loopback port, so the router reaches the stages through the same gRPC calls, tensor
transport and policy as in the disaggregated stack; only the process boundaries are gone. The embedding
cache stays in Redis (a private redis-server child unless --redis-url is given).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import tempfile

from mmserve import rpc
from mmserve.launcher import (Child, Stack, StackSpec, free_port, port_in_use_error, redis_server_argv,
                              redis_server_binary)
from mmserve.roles import Role

log = logging.getLogger("mmserve.aggregated")


async def start_roles(spec: StackSpec, redis_url: str, roles: list[Role]) -> None:
    """Builds and starts the stages, then the router pointed at them; appends each role to roles as it is built."""
    from services.decoder.__main__ import build_decoder
    from services.decoder.config import DecoderConfig
    from services.encoder.__main__ import build_encoder
    from services.encoder.config import EncoderConfig
    from services.llm.__main__ import build_llm
    from services.llm.config import LlmConfig
    from services.router.__main__ import build_router
    from services.router.config import RouterConfig

    # Stages bind port 0 on the host: the kernel picks, so nothing races for a port picked in advance.
    common = dict(host=spec.host, port=0, log_level=spec.log_level, transport=spec.transport)
    stages = [("decoder", build_decoder, DecoderConfig(media_root=spec.media_root, **common))]
    stages += [("encoder", build_encoder, EncoderConfig(model=spec.model, redis_url=redis_url, **common))
               for _ in range(spec.num_encoders)]
    stages.append(("llm", build_llm, LlmConfig(model=spec.model, **common)))
    addresses: dict[str, list[str]] = {"decoder": [], "encoder": [], "llm": []}
    for stage, build, config in stages:
        roles.append(role := await build(config))
        addresses[stage].append(f"{spec.host}:{await role.start()}")
    base = RouterConfig(model=spec.model, host=spec.host, port=spec.port, log_level=spec.log_level,
                        transport=spec.transport, redis_url=redis_url, media_root=spec.media_root,
                        decoder_addrs=",".join(addresses["decoder"]), encoder_addrs=",".join(addresses["encoder"]),
                        llm_addrs=",".join(addresses["llm"]), http_port=spec.http_port,
                        # One Prometheus registry per process: the router's endpoint has every stage's metrics.
                        metrics_port=free_port(spec.host) if spec.metrics else 0)
    # Further router flags as `mmserve up` passes them: parsed after ours, so the last occurrence wins.
    config = RouterConfig.parse([*base.to_argv(), *spec.router_args])
    roles.append(router := await build_router(config))
    await router.start()
    if config.metrics_port:
        log.info("metrics of every stage on :%d/metrics", config.metrics_port)


async def run_aggregated(spec: StackSpec, ready_timeout_s: float = 300.0) -> int:
    """Runs every stage in this process until SIGINT/SIGTERM; returns the exit code."""
    if (error := port_in_use_error(spec)) is not None:
        print(f"mmserve up: {error}", file=sys.stderr)
        return 2
    redis_url, redis = spec.redis_url, None
    if not redis_url:
        port = free_port(spec.host)
        redis_url = f"redis://{spec.host}:{port}/0"
        redis = Stack([Child("redis", redis_server_argv(redis_server_binary(), spec.host, port,
                                                        maxmemory=spec.redis_maxmemory,
                                                        workdir=tempfile.gettempdir()), None)])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    roles: list[Role] = []
    code = 0
    try:
        if redis is not None:
            redis.start()
        starting = asyncio.create_task(asyncio.wait_for(start_roles(spec, redis_url, roles), ready_timeout_s))
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if stopping in done:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return 0
        stopping.cancel()
        starting.result()
        print(f"mmserve: router listening on {spec.host}:{spec.port} (aggregated: every stage in pid {os.getpid()})",
              flush=True)
        if spec.http_port:
            print(f"mmserve: OpenAI-compatible API on http://{spec.host}:{spec.http_port}/v1", file=sys.stderr,
                  flush=True)
        await stop.wait()
    except (OSError, RuntimeError, TimeoutError, ValueError) as err:
        print(f"mmserve up: {err}", file=sys.stderr)
        code = 1
    finally:
        for role in reversed(roles):  # router first, so no new work reaches a stopped stage
            try:
                await role.stop()
            except Exception:  # one role failing to stop must not keep the others running
                log.exception("stopping a role failed")
        if redis is not None:
            await asyncio.to_thread(redis.stop)
    return code


def main_aggregated(spec: StackSpec) -> int:
    """Entry point of `mmserve up --aggregated`."""
    rpc.setup_logging(spec.log_level)
    return asyncio.run(run_aggregated(spec))
