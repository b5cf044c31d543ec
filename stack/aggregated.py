"""`mmserve up --aggregated`: the decoder, encoder, llm and router in ONE process and one event loop.

It runs what `mmserve up` plans (`launcher.plan`: the same configs, flags and private redis-server), but
builds each stage in this process with the function its own process uses (`services.<role>.__main__`'s
`build_<role>`). Each stage serves on a loopback port of its own, so the router reaches the stages through
the same gRPC calls, tensor transport and policy as in the disaggregated stack; only the process
boundaries are gone. The embedding cache stays in Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys

from mmserve import rpc
from mmserve.roles import Role
from stack.launcher import Plan, Stack, StackSpec, plan, port_in_use_error
from stack.ports import free_port

log = logging.getLogger("stack.aggregated")
STAGES = ("decoder", "encoder", "llm")


async def start_roles(spec: StackSpec, planned: Plan, roles: list[Role]) -> None:
    """Builds and starts the planned stages, then the router pointed at them; appends each role as it is built."""
    from services.decoder.__main__ import build_decoder
    from services.encoder.__main__ import build_encoder
    from services.llm.__main__ import build_llm
    from services.router.__main__ import build_router

    builders = {"decoder": build_decoder, "encoder": build_encoder, "llm": build_llm}
    addresses: dict[str, list[str]] = {stage: [] for stage in STAGES}
    for stage, config in planned.services:
        if stage in STAGES:
            # Port 0: the kernel picks as the stage binds, so no port picked in advance can be lost to a race.
            # One Prometheus registry per process: the router's endpoint has every stage's metrics.
            config = dataclasses.replace(config, port=0, metrics_port=0)
            roles.append(role := await builders[stage](config))
            addresses[stage].append(f"{config.host}:{await role.start()}")
    planned_router = next(config for stage, config in planned.services if stage == "router")
    config = dataclasses.replace(planned_router, decoder_addrs=",".join(addresses["decoder"]),
                                 encoder_addrs=",".join(addresses["encoder"]), llm_addrs=",".join(addresses["llm"]),
                                 metrics_port=free_port(spec.host) if spec.metrics else 0)
    roles.append(router := await build_router(config))
    await router.start()
    if config.metrics_port:
        log.info("metrics of every stage on :%d/metrics", config.metrics_port)


async def run_aggregated(spec: StackSpec, ready_timeout_s: float = 300.0) -> int:
    """Runs every stage in this process until SIGINT/SIGTERM; returns the exit code."""
    if (error := port_in_use_error(spec)) is not None:
        print(f"mmserve up: {error}", file=sys.stderr)
        return 2
    planned = plan(spec)
    redis = Stack([c for c in planned.children() if c.address is None])  # private redis-server unless --redis-url
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    roles: list[Role] = []
    code = 0
    try:
        redis.start()
        starting = asyncio.create_task(asyncio.wait_for(start_roles(spec, planned, roles), ready_timeout_s))
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if stopping in done:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return 0
        stopping.cancel()
        starting.result()
        print(f"mmserve: router listening on {planned.router_address} (aggregated: every stage in pid "
              f"{os.getpid()})", flush=True)
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
        await asyncio.to_thread(redis.stop)
    return code


def main_aggregated(spec: StackSpec) -> int:
    """Entry point of `mmserve up --aggregated`."""
    rpc.setup_logging(spec.log_level)
    return asyncio.run(run_aggregated(spec))
