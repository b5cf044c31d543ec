"""Replica registry in Redis: replicas announce themselves with heartbeats; the router lists the live ones.

Each replica keeps one key `mmserve:replica:<stage>:<address>` alive with a short TTL. A replica that
stops heartbeating (killed, partitioned, hung) disappears from the listing when its key expires.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time

import redis.asyncio as aioredis

from mmserve import auth

log = logging.getLogger(__name__)

PREFIX = "mmserve:replica:"
# A unified replica's entry: its two roles' addresses as one, `<encoder>/<llm>` (services/router/pools.py).
UNIFIED_STAGE = "unified"


def _key(stage: str, address: str) -> str:
    return f"{PREFIX}{stage}:{address}"


def advertised_address(host: str, port: int, advertise: str = "") -> str:
    """The address other services reach this one at: explicit, else host:port (the hostname for 0.0.0.0)."""
    if advertise:
        return advertise
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"{host}:{port}"


def redis_password(config) -> str | None:
    """The password of a service's Redis (its redis_password_file), or None; read now, so a bad file fails start-up."""
    return auth.read_secret("redis_password_file", config.redis_password_file) if config.redis_password_file else None


class Registration:
    """Keeps one replica's registry entry alive until stopped (then deletes it at once)."""

    def __init__(self, url: str, stage: str, address: str, *, ttl_s: float = 3.0, interval_s: float = 1.0,
                 password: str | None = None):
        self.client = aioredis.Redis.from_url(url, password=password, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.key = _key(stage, address)
        self.value = json.dumps({"stage": stage, "address": address, "pid": os.getpid(), "since": time.time()})
        self.ttl_ms = int(ttl_s * 1000)
        self.interval_s = interval_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._heartbeat())

    async def _heartbeat(self) -> None:
        failing = False
        while True:
            try:
                await self.client.set(self.key, self.value, px=self.ttl_ms)
                if failing:
                    log.info("registry reachable again")
                failing = False
            except (aioredis.RedisError, OSError) as err:
                if not failing:  # logged once per outage
                    log.warning("registry heartbeat failed: %s", err)
                failing = True
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            await self.client.delete(self.key)
        except (aioredis.RedisError, OSError):
            pass  # the key expires on its own
        await self.client.aclose()


class RegistryReader:
    """The router's view: addresses of live replicas per stage."""

    def __init__(self, url: str, password: str | None = None):
        self.client = aioredis.Redis.from_url(url, password=password, socket_timeout=1.0, socket_connect_timeout=1.0)

    async def members(self, stage: str) -> list[str] | None:
        """Live addresses of one stage, or None when the registry cannot be read (keep the last view)."""
        try:
            keys = [k async for k in self.client.scan_iter(match=f"{PREFIX}{stage}:*", count=1000)]
        except (aioredis.RedisError, OSError):
            return None
        prefix = f"{PREFIX}{stage}:"
        return sorted(k.decode()[len(prefix):] for k in keys)

    async def close(self) -> None:
        await self.client.aclose()
