"""compose.yaml's own commands and health checks run the stack (as processes, no Docker); the probe on the stack."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
import redis

from mmserve import rpc
from mmserve.launcher import Child, Stack, free_port
from mmserve.media.samples import make_image
from mmserve.v1 import api_pb2, api_pb2_grpc
from tests.integration.helpers import collect, request, text
from tests.unit.test_compose import CONFIGS, load_compose, option_value

# What a test machine's .env would say: the tiny model needs no 8 GiB KV cache, and float32 on the CPU.
TEST_ENV = {"DTYPE": "float32", "LLM_KV_CACHE_BYTES": str(64 * 1024 * 1024), "LOG_LEVEL": "WARNING"}


def rewrite(argv: list[str], ports: dict[str, int], compose_ports: dict[str, str], mounts: dict[str, str],
            redis_url: str) -> list[str]:
    """A container command for this host: loopback, free ports, fixture paths and Redis instead of container ones."""
    out = list(argv)
    for i in range(1, len(out) - 1):
        flag, value = out[i], out[i + 1]
        if not flag.startswith("--"):
            continue
        if flag == "--host":
            out[i + 1] = "127.0.0.1"
        elif flag == "--port":
            out[i + 1] = str(ports[argv[0].removeprefix("services.")])
        elif flag.endswith("-port") and value != "0":
            out[i + 1] = str(free_port())
        elif flag in ("--redis-url", "--registry-url"):
            assert value.startswith("redis://redis:"), value  # compose's redis service
            out[i + 1] = redis_url
        elif value in mounts:
            out[i + 1] = mounts[value]
        elif flag.endswith("-addrs") or flag == "--advertise-address":  # compose service names
            addresses = []
            for address in value.split(","):
                service, port = address.split(":")
                assert compose_ports[service] == port, f"{address}: not {service}'s --port"
                addresses.append(f"127.0.0.1:{ports[service]}")
            out[i + 1] = ",".join(addresses)
    return out


def start_order(services: dict[str, dict]) -> list[list[str]]:
    """Waves of services whose depends_on are met by earlier waves (redis is the fixture, already healthy)."""
    done, waves = {"redis"}, []
    while len(done) < len(services):
        wave = sorted(n for n, s in services.items() if n not in done and set(s.get("depends_on", {})) <= done)
        assert wave, f"depends_on cycle among {set(services) - done}"
        waves.append(wave)
        done.update(wave)
    return waves


def wait_healthy(children: dict[str, Child], probes: dict[str, list[str]], timeout_s: float = 300) -> None:
    """Runs each compose health check until it passes, like Compose does; fails if a service exits first."""
    deadline, pending = time.monotonic() + timeout_s, dict(probes)
    while pending:
        for name in sorted(pending):
            code = children[name].process.poll()
            assert code is None, f"{name} exited with {code} during start-up"
            if subprocess.run(pending[name], capture_output=True, timeout=60).returncode == 0:
                del pending[name]
        if pending:
            assert time.monotonic() < deadline, f"never healthy: {sorted(pending)}"
            time.sleep(0.5)  # Compose's own health checks poll on an interval too


@pytest.mark.slow
def test_compose_commands_serve_a_request(tiny_model, redis_server, media_root):
    services = load_compose(env=TEST_ENV)["services"]
    mmserve = {name: service for name, service in services.items() if name in CONFIGS}
    compose_ports = {name: option_value(s["command"], "--port") for name, s in mmserve.items()}
    ports = {name: free_port() for name in mmserve}
    mounts = {"/model": str(tiny_model), "/media": str(media_root)}
    for service in mmserve.values():
        assert {volume.split(":")[1] for volume in service["volumes"]} == set(mounts)

    children, probes = {}, {}
    for name, service in mmserve.items():
        argv = rewrite(service["command"], ports, compose_ports, mounts, redis_server.url)
        children[name] = Child(name, [sys.executable, "-m", *argv], f"127.0.0.1:{ports[name]}")
        kind, python, *probe = service["healthcheck"]["test"]
        assert (kind, python, probe[-1]) == ("CMD", "python", f"127.0.0.1:{compose_ports[name]}")
        probes[name] = [sys.executable, *probe[:-1], f"127.0.0.1:{ports[name]}"]

    started: list[Child] = []
    stack = Stack(started)
    try:
        for wave in start_order(services):
            wave = [name for name in wave if name in mmserve]
            Stack([children[name] for name in wave]).start()
            started += [children[name] for name in wave]
            wait_healthy(children, {name: probes[name] for name in wave})

        (media_root / "compose.png").write_bytes(make_image(width=64, height=48))
        picture = api_pb2.Part(image=api_pb2.Media(uri=f"file://{media_root / 'compose.png'}"))
        with grpc.insecure_channel(children["router"].address, options=rpc.message_options(64 << 20)) as channel:
            result = collect(api_pb2_grpc.RouterStub(channel), request(picture, text("What is this?"), num_tokens=8))
        assert result.final.completion_tokens == 8 and result.final.finish_reason == "length"
        assert result.final.num_media == 1 and len(result.token_ids) == 8
        # Every service announced itself in the registry at the address compose gives it (here, loopback).
        wanted = {f"mmserve:replica:{name}:127.0.0.1:{ports[name]}" for name in mmserve}
        registry = redis.Redis.from_url(redis_server.url)
        deadline = time.monotonic() + 30  # a hang guard: heartbeats start as each service starts serving
        while not wanted <= {k.decode() for k in registry.scan_iter("mmserve:replica:*")}:
            assert time.monotonic() < deadline, f"not registered: {wanted}"
            time.sleep(0.2)
    finally:
        stack.stop()
    assert {c.name: c.process.returncode for c in started} == {name: 0 for name in mmserve}, "unclean stop"


def _probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmserve.probe", *args], capture_output=True, text=True, timeout=60)


def test_probe_says_serving_for_the_stack_and_its_services(stack):
    whole = _probe(stack)
    assert whole.returncode == 0 and whole.stdout.strip() == f"{stack}: SERVING", whole
    named = _probe(stack, "--service", "mmserve.v1.Router", "--timeout", "10")
    assert named.returncode == 0, named
    unknown = _probe(stack, "--service", "mmserve.v1.Nope")
    assert unknown.returncode == 1 and "no health status for service 'mmserve.v1.Nope'" in unknown.stderr
