"""compose.yaml's own commands and health checks run the stack (as processes, no Docker), plaintext and with TLS and
tokens; the probe on the stack."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
import redis

from mmserve import rpc, tls
from stack.launcher import Child, Stack
from stack.ports import free_port
from stack.secrets import write_secrets
from mmserve.media.samples import make_image
from mmserve.v1 import api_pb2, api_pb2_grpc
from tests.integration.helpers import collect, request, text
from tests.unit.compose_files import CONFIGS, TLS_ENV, TLS_MOUNT, TOKENS_FILE, load_compose, option_value

# What a test machine's .env would say: the tiny model needs no 8 GiB KV cache (and its float32 stays float32).
TEST_ENV = {"DTYPE": "auto", "LLM_KV_CACHE_BYTES": str(64 * 1024 * 1024), "LOG_LEVEL": "WARNING"}
TOKEN = "sk-compose"


def host_path(value: str, mounts: dict[str, str]) -> str:
    """A container path under one of compose's mounts, as the path on this host (other values as they are)."""
    for target, source in mounts.items():
        if value == target or value.startswith(target + "/"):
            return source + value[len(target):]
    return value


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
        elif flag == "--redis-password-file":
            assert value == "/run/secrets/redis_password", value
            out[i + 1] = ""  # the fixture's Redis, in place of compose's, has no password
        elif host_path(value, mounts) != value:
            out[i + 1] = host_path(value, mounts)
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
@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "tls"])
def test_compose_commands_serve_a_request(tiny_model, redis_server, media_root, tmp_path, secure):
    secrets = write_secrets(str(tmp_path / "secrets"))  # what `mmserve secrets` writes for compose's secrets
    mounts = {"/model": str(tiny_model), "/media": str(media_root),
              "/run/secrets/internal_token": secrets["internal-token"]}
    env = dict(TEST_ENV)
    if secure:  # TLS_DIR and API_TOKENS_FILE set, as in .env; certificates for the compose names (probes, peers)
        certs = tls.make_dev_certs(tmp_path / "certs", names=(*CONFIGS, "127.0.0.1"))
        (tmp_path / "tokens").write_text(f"{TOKEN}\n")
        mounts |= {TLS_MOUNT: str(certs), TOKENS_FILE: str(tmp_path / "tokens")}
        env |= TLS_ENV
    services = load_compose(env=env)["services"]
    mmserve = {name: service for name, service in services.items() if name in CONFIGS}
    compose_ports = {name: option_value(s["command"], "--port") for name, s in mmserve.items()}
    ports = {name: free_port() for name in mmserve}
    for service in mmserve.values():
        assert {volume.split(":")[1] for volume in service["volumes"]} <= {*mounts, TLS_MOUNT, TOKENS_FILE}

    children, probes = {}, {}
    for name, service in mmserve.items():
        argv = rewrite(service["command"], ports, compose_ports, mounts, redis_server.url)
        children[name] = Child(name, [sys.executable, "-m", *argv], f"127.0.0.1:{ports[name]}")
        kind, python, *probe = service["healthcheck"]["test"]
        assert (kind, python, probe[2]) == ("CMD", "python", f"127.0.0.1:{compose_ports[name]}")
        probes[name] = [sys.executable, *probe[:2], f"127.0.0.1:{ports[name]}",
                        *(host_path(a, mounts) for a in probe[3:])]

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
        address, options = children["router"].address, rpc.message_options(64 << 20)
        if secure:
            ca = tls.read_pem("ca", str(certs / "ca.pem"))
            with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca), options=options) as channel:
                with pytest.raises(grpc.RpcError) as refused:  # no token
                    collect(api_pb2_grpc.RouterStub(channel), request(text("Hi"), num_tokens=1))
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with_token = grpc.composite_channel_credentials(grpc.ssl_channel_credentials(ca),
                                                            grpc.access_token_call_credentials(TOKEN))
            channel = grpc.secure_channel(address, with_token, options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        with channel:
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
