"""The load test's TLS and token flags: checked by run.py, passed on to Locust; a TLS channel that sends the token."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses

import grpc
import pytest

from loadtest import connection
from loadtest.run import locust_command, parse_args, wait_ready
from mmserve import auth, tls
from mmserve.v1 import api_pb2, api_pb2_grpc
from tests.unit.echo_router import echo_router

TOKEN = "sk-load"


@pytest.fixture
def token_file(tmp_path, monkeypatch):
    monkeypatch.delenv(auth.CLIENT_TOKEN_ENV, raising=False)
    monkeypatch.delenv(auth.TOKENS_ENV, raising=False)
    path = tmp_path / "token"
    path.write_text(f"# the load test's\n{TOKEN}\n")
    return path


def test_plaintext_and_no_token_unless_asked(monkeypatch):
    monkeypatch.delenv(auth.CLIENT_TOKEN_ENV, raising=False)
    args = parse_args([])
    assert args.connection == connection.Connection() and args.connection.metadata is None
    assert connection.forwarded(args) == []
    monkeypatch.setenv(auth.CLIENT_TOKEN_ENV, "sk-env")  # as `mmserve generate`; Locust inherits the variable
    assert parse_args([]).connection.metadata == (("authorization", "Bearer sk-env"),)


def test_flags_are_checked_then_passed_on_to_locust_with_absolute_paths(certs, token_file, tmp_path, monkeypatch):
    monkeypatch.chdir(certs)
    args = parse_args(["--tls-ca-file", "ca.pem", "--tls-cert-file", "client.pem", "--tls-key-file", "client.key",
                       "--tls-server-name", "router", "--token-file", str(token_file)])
    assert args.connection == connection.Connection(tls.ClientTls("ca.pem", "client.pem", "client.key", "router"),
                                                    TOKEN)
    argv = locust_command(args, tmp_path / "locust")
    assert TOKEN not in " ".join(argv)  # the file's name travels, never the secret
    # What the locustfile does with Locust's parsed options: the same connection, whatever Locust's directory.
    parser = argparse.ArgumentParser()
    connection.add_arguments(parser)
    forwarded, _ = parser.parse_known_args(argv)
    assert connection.from_args(forwarded) == dataclasses.replace(
        args.connection, client_tls=tls.ClientTls(str(certs / "ca.pem"), str(certs / "client.pem"),
                                                  str(certs / "client.key"), "router"))


@pytest.mark.parametrize("flags, message", [(["--tls-ca-file", "absent.pem"], "tls_ca_file: cannot read"),
                                            (["--token-file", "absent"], "--token-file: cannot read"),
                                            (["--tls-cert-file", "c.pem"], "give both the certificate and its key")])
def test_a_bad_flag_stops_run_before_locust_starts(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        parse_args(flags)
    assert info.value.code == 2 and message in capsys.readouterr().err


async def test_the_channel_speaks_tls_and_every_request_carries_the_token(certs, token_file):
    secure = connection.from_args(parse_args(["--tls-ca-file", str(certs / "ca.pem"), "--token-file", str(token_file)]))

    def generate(via: connection.Connection) -> list[str]:  # as GrpcUser does, on a blocking channel
        with via.channel(address, 1 << 20) as channel:
            replies = api_pb2_grpc.RouterStub(channel).Generate(api_pb2.GenerateRequest(), timeout=30,
                                                                metadata=via.metadata)
            return [r.delta.text for r in replies]

    async with echo_router(certs, token_file) as address:
        assert await asyncio.to_thread(generate, secure) == ["hello"]
        assert await asyncio.to_thread(wait_ready, address, 30, secure)
        with pytest.raises(grpc.RpcError) as info:
            await asyncio.to_thread(generate, dataclasses.replace(secure, token=None))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert not await asyncio.to_thread(wait_ready, address, 1, connection.Connection())  # plaintext: no answer
