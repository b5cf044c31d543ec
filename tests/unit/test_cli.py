"""The `mmserve` command and `python -m mmserve.probe`: help texts, one-line errors, progress, health answers."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys

import pytest
from grpc_health.v1 import health_pb2

from mmserve import probe, rpc
from stack import ports
from stack.cli import build_parser, model_error
from stack.launcher import Child, Stack, StackSpec, plan
from stack.ports import free_port

COMMANDS = ("tiny-model", "up", "generate", "decode", "certs", "secrets")


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command):
    result = run("stack", command, "--help")
    assert result.returncode == 0, result.stderr
    assert subcommands()[command].description.split()[0] in result.stdout  # the description is shown
    for action in subcommands()[command]._actions:
        assert action.help, f"mmserve {command} {action.option_strings or action.dest}: no help text"


def test_top_level_help_lists_every_command():
    result = run("stack", "--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout
    assert set(subcommands()) == set(COMMANDS)


def one_line_error(result: subprocess.CompletedProcess, prefix: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    return lines[0]


def test_up_refuses_a_directory_without_config_json(tmp_path):
    line = one_line_error(run("stack", "up", "--model", str(tmp_path)), "mmserve up: --model")
    assert "no config.json" in line


def test_up_refuses_a_path_that_is_not_there(tmp_path):
    line = one_line_error(run("stack", "up", "--model", str(tmp_path / "nope")), "mmserve up: --model")
    assert "no such directory" in line


def test_model_checks(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert model_error(str(tmp_path)) is None
    assert model_error("Qwen/Qwen2.5-VL-3B-Instruct") is None
    assert "not a directory" in model_error(str(tmp_path / "config.json"))
    assert "no such directory" in model_error("./checkpoints/missing")
    assert "no config.json" in model_error(str(tmp_path.parent))


def test_up_refuses_a_taken_port_before_starting_anything(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_error(run("stack", "up", "--model", str(tmp_path), "--port", str(port)), "mmserve up:")
    assert f"port {port}" in line and "already in use" in line


def test_tiny_model_shows_its_steps(tmp_path):
    result = run("stack", "tiny-model", "--out", str(tmp_path / "tiny"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "tiny")  # stdout keeps just the path, for scripts
    assert "4/4" in result.stderr  # the progress bar reached its last step
    assert (tmp_path / "tiny" / "config.json").is_file()


def test_tiny_model_names_a_bad_preset(tmp_path):
    result = run("stack", "tiny-model", "--out", str(tmp_path / "tiny"), "--preset", "huge")
    assert one_line_error(result, "mmserve tiny-model: preset: 'huge' is not one of")
    assert not (tmp_path / "tiny").exists()


# --- the health probe --------------------------------------------------------------------------------------------

def test_probe_of_a_closed_port_fails_and_says_why():
    result = run("mmserve.probe", f"127.0.0.1:{free_port()}", timeout=60)
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr and "onnect" in result.stderr  # connection refused, in gRPC's words


def test_probe_follows_the_health_status(health_server):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert probe.check(address) == (False, f"{address}: NOT_SERVING")
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert probe.check(address) == (True, f"{address}: SERVING")
    assert probe.check(address, "mmserve.v1.Llm") == (False, f"{address}: no health status for service "
                                                                "'mmserve.v1.Llm'")
    servicer.set("mmserve.v1.Llm", health_pb2.HealthCheckResponse.SERVING)
    assert probe.check(address, "mmserve.v1.Llm")[0]


def test_probe_exit_codes(health_server):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert probe.main([address]) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert probe.main([address, "--timeout", "2"]) == 1
    assert probe.main([address, "--timeout", "0"]) == 2


def test_secrets_writes_private_files_once(tmp_path):
    out = tmp_path / "secrets"
    result = run("stack", "secrets", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(out / name) for name in ("internal-token", "redis-password", "redis.conf")]
    assert out.stat().st_mode & 0o777 == 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(
        ("internal-token", "redis-password", "redis.conf"), 0o600)
    password = (out / "redis-password").read_text().strip()
    assert (out / "redis.conf").read_text() == f"requirepass {password}\n" and password not in result.stdout
    again = run("stack", "secrets", "--out", str(out))  # never replaces the secrets a stack runs with
    assert again.returncode == 1 and "exists" in again.stderr


def test_generate_logprobs_asks_for_them_and_prints_one_line_per_token():
    from mmserve.client import build_request, format_logprobs
    from mmserve.v1 import api_pb2

    assert build_parser().parse_args(["generate", "--prompt", "hi", "--logprobs", "3"]).logprobs == 3
    sampling = build_request("hi", [], [], max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=3).sampling
    assert (sampling.logprobs, sampling.top_logprobs) == (True, 3)
    assert not build_request("hi", [], [], max_tokens=4, temperature=0.0).sampling.logprobs
    entry = api_pb2.TokenLogprobs(chosen=api_pb2.TokenLogprob(text=" sea", logprob=-0.5),
                                  top=[api_pb2.TokenLogprob(text=" sea", logprob=-0.5),
                                       api_pb2.TokenLogprob(text=" sky", logprob=-1.25)])
    assert format_logprobs(entry) == "' sea' -0.5000  | ' sea' -0.5000  ' sky' -1.2500"


def test_up_notices_a_started_stage_at_once():
    """The launcher's health checks and the router it starts retry a stage that still refuses connections every
    100 ms at most, not after gRPC's default backoff (1 s, growing), which noticed a stage seconds after it served."""
    planned = plan(StackSpec(model="/m", redis_url="redis://127.0.0.1:1/0"))
    assert dict(planned.services)["router"].replica_reconnect_max_ms <= 100
    options = dict(rpc.STARTUP_RECONNECT_OPTIONS)
    assert max(options["grpc.initial_reconnect_backoff_ms"], options["grpc.max_reconnect_backoff_ms"]) <= 100


@pytest.mark.parametrize("outside, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_children_get_passive_openmp_threads_unless_the_environment_says_otherwise(tmp_path, monkeypatch, outside,
                                                                                     expected):
    if outside is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", outside)
    out = tmp_path / "policy"
    child = Child("probe", [sys.executable, "-c", f"import os; open({str(out)!r}, 'w').write("
                                                  "os.environ.get('OMP_WAIT_POLICY', 'unset'))"], None)
    Stack([child]).start_child(child)
    assert child.process.wait(timeout=30) == 0 and out.read_text() == expected


def test_free_port_never_gives_a_port_twice_though_the_kernel_offers_it_again(tmp_path, monkeypatch):
    offered = iter([45001, 45001, 45002])  # the kernel may offer a port again until something binds it
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("20500\t60999\n")  # too few ports below it: the kernel's pick
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", ranges)
    monkeypatch.setattr(ports, "_kernel_pick", lambda host: next(offered))
    monkeypatch.setattr(ports, "_GIVEN", set())
    assert [free_port(), free_port()] == [45001, 45002]


def test_each_child_is_healthy_only_when_its_own_stage_serves(health_server):
    """An address that reaches another stage's process (here an encoder's) is never taken for the llm's."""
    children = {c.name: c for c in plan(StackSpec(model="/m", redis_url="redis://127.0.0.1:1/0")).children()}
    assert {name: c.health_service for name, c in children.items()} == {
        "decoder": "mmserve.v1.Decoder", "encoder": "mmserve.v1.Encoder", "llm": "mmserve.v1.Llm",
        "router": "mmserve.v1.Router"}
    address, servicer = health_server
    for name in ("", "mmserve.v1.Encoder"):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    with pytest.raises(TimeoutError):
        asyncio.run(rpc.wait_healthy(address, 1.0, children["llm"].health_service))
    asyncio.run(rpc.wait_healthy(address, 10.0, children["encoder"].health_service))


def test_free_ports_lie_below_the_kernel_s_ephemeral_range(tmp_path, monkeypatch):
    """An outgoing connection takes its port from the ephemeral range: one of ours there could be taken while its
    stage restarts."""
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("40000\t60999\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", ranges)
    drawn_from = []
    monkeypatch.setattr(ports.random, "choice", lambda candidates: drawn_from.append(candidates) or 41234)
    monkeypatch.setattr(ports, "_kernel_pick", lambda host: 45123)
    monkeypatch.setattr(ports, "_GIVEN", set())
    assert free_port() == 41234 and drawn_from == [range(ports.LOWEST_PORT, 40000)]
    ranges.write_text("20500\t60999\n")  # too few below it: the kernel's pick
    assert free_port() == 45123


def test_a_stack_s_ports_are_all_different_from_the_router_s(monkeypatch):
    offered = iter([50051, 8000, 45001, 45002, 45003, 45004])  # the router's ports first: never given again
    monkeypatch.setattr(ports, "_GIVEN", set())
    monkeypatch.setattr(ports.random, "choice", lambda candidates: next(offered))
    planned = plan(StackSpec(model="/m", port=50051, http_port=8000))
    assert [(stage, config.port) for stage, config in planned.services] == [
        ("decoder", 45001), ("encoder", 45002), ("llm", 45003), ("router", 50051)]
    assert planned.redis_argv[planned.redis_argv.index("--port") + 1] == "45004"
