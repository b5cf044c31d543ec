"""The soak test's verdicts: a steady series with noise is flat, a leak is growing, warm-up is not judged; and
its TLS and token flags (those of run.py) reach the channel and every request."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import pytest

from loadtest import connection, workloads
from loadtest.soak import Load, parse_args, verdicts
from mmserve import auth, tls
from tests.unit.echo_router import echo_router

TOKEN = "sk-soak"


def _samples(series: dict[str, Callable[[float], float]], minutes: float = 10, every_s: float = 5) -> list[tuple[float, dict]]:
    return [(t, {key: f(t / 60) for key, f in series.items()}) for t in
            (i * every_s for i in range(int(minutes * 60 / every_s) + 1))]


def _verdict(samples, key: str, warmup: float = 0.2) -> str:
    return next(r["verdict"] for r in verdicts(samples, warmup) if r["series"] == key)


def test_noise_around_a_level_is_flat():
    rng = random.Random(0)
    samples = _samples({"rss_mb router": lambda m: 400 + rng.uniform(-20, 20),
                        "kv_blocks_used llm": lambda m: rng.randrange(0, 64),
                        "fds llm": lambda m: 40 + rng.randrange(0, 4)})
    assert {r["verdict"] for r in verdicts(samples, 0.2)} == {"flat"}


def test_a_leak_grows():
    samples = _samples({"rss_mb decoder": lambda m: 300 + 12 * m, "shm_segments": lambda m: 2 + 3 * m,
                        "fds encoder": lambda m: 30 + 2 * m})
    assert {r["verdict"] for r in verdicts(samples, 0.2)} == {"growing"}


def test_warm_up_growth_is_not_judged():
    # A cache that fills in the first minute, then stays: growing only if the warm-up were judged.
    samples = _samples({"rss_mb router": lambda m: 300 + 200 * min(m, 1.0)})
    assert _verdict(samples, "rss_mb router", warmup=0.2) == "flat"
    assert _verdict(samples, "rss_mb router", warmup=0.0) == "growing"


def test_the_summary_reports_start_end_and_max():
    row = verdicts(_samples({"fds router": lambda m: 50 - m}), 0.2)[0]
    assert (row["start"], row["end"], row["max"]) == (50, 40, 50)


def test_durations_parse():
    assert parse_args(["--duration", "2m", "--calibrate", "20s"]).duration_s == 120


@pytest.fixture
def token_file(tmp_path, monkeypatch):
    monkeypatch.delenv(auth.CLIENT_TOKEN_ENV, raising=False)
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\n")
    return path


def test_plaintext_and_no_token_unless_asked(monkeypatch):
    monkeypatch.delenv(auth.CLIENT_TOKEN_ENV, raising=False)
    assert parse_args(["--addr", "127.0.0.1:1"]).connection == connection.Connection()


def test_tls_and_token_flags_make_the_connection(certs, token_file):
    args = parse_args(["--addr", "router:50051", "--tls-ca-file", str(certs / "ca.pem"), "--tls-server-name",
                       "router", "--token-file", str(token_file)])
    assert args.connection == connection.Connection(tls.ClientTls(str(certs / "ca.pem"), server_name="router"), TOKEN)


@pytest.mark.parametrize("flags, message", [
    (["--addr", "router:50051", "--tls-ca-file", "absent.pem"], "tls_ca_file: cannot read"),
    (["--addr", "router:50051", "--token-file", "absent"], "--token-file: cannot read"),
    (["--tls"], "only with --addr"),  # the stack soak.py starts itself is plaintext
])
def test_a_bad_flag_stops_the_soak_before_it_starts(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        parse_args(flags)
    assert info.value.code == 2 and message in capsys.readouterr().err


async def test_the_load_speaks_tls_and_every_request_carries_the_token(certs, token_file):
    workload = workloads.SyntheticWorkload({"text": 1.0}, {}, max_tokens=1)

    async def outcome(address: str, via: connection.Connection) -> str:
        load = Load(address, workload, 30, via)
        try:
            return await load.one()
        finally:
            await load.channel.close()

    async with echo_router(certs, token_file) as address:
        secure = parse_args(["--addr", address, "--tls-ca-file", str(certs / "ca.pem"),
                             "--token-file", str(token_file)]).connection
        assert await outcome(address, secure) == "OK"
        assert await outcome(address, dataclasses.replace(secure, token=None)) == "UNAUTHENTICATED"
        assert await outcome(address, connection.Connection(token=TOKEN)) == "UNAVAILABLE"  # plaintext: no answer
