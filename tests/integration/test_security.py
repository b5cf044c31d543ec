"""Access control on real processes: `mmserve up --tls-dir --api-tokens-file` (bearer tokens, TLS on the public
ports, mutual TLS between the services), the clients' TLS and token flags, and the HTTP API's 401s."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import openai
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmserve import auth, rpc, tls
from stack.ports import free_port
from mmserve.media.samples import make_image
from mmserve.v1 import api_pb2, api_pb2_grpc
from services.router.config import RouterConfig
from services.router.openai_api import ROUTER_SERVICE, OpenAiServer
from tests.integration.helpers import collect, image, request, text
from tests.integration.reference import Reference

FILE_TOKEN, ENV_TOKEN = "sk-from-the-file", "sk-from-the-env"
STAGES = ("services.decoder", "services.encoder", "services.llm")


@dataclasses.dataclass
class SecureStack:
    address: str
    http_port: int
    certs: pathlib.Path
    tokens_file: pathlib.Path
    stage_addresses: dict[str, str]  # services.<stage> → host:port
    router_pid: int

    @property
    def ca(self) -> tls.ClientTls:
        return tls.ClientTls(str(self.certs / "ca.pem"))

    def channel(self) -> grpc.Channel:
        return grpc.secure_channel(self.address, self.ca.credentials(), options=rpc.message_options(64 << 20))


def _children(up: subprocess.Popen) -> tuple[dict[str, str], int]:
    """The stages' addresses (services.<stage> → host:port) and the router's pid."""
    found, router = {}, 0
    for child in psutil.Process(up.pid).children(recursive=True):
        argv = child.cmdline()
        for stage in STAGES:
            if stage in argv:
                found[stage] = f"127.0.0.1:{argv[argv.index('--port') + 1]}"
        if "services.router" in argv:
            router = child.pid
    return found, router


@pytest.fixture(scope="module")
def secure(tiny_model, tmp_path_factory):
    """`mmserve up` with TLS everywhere, mutual TLS inside, and tokens from a file and the environment."""
    root = tmp_path_factory.mktemp("security")
    made = subprocess.run([sys.executable, "-m", "stack.cli", "certs", "--out", str(root / "tls")],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    certs = pathlib.Path(made.stdout.strip())
    tokens_file = root / "tokens"
    tokens_file.write_text(f"# API keys\n{FILE_TOKEN}\n")
    port, http_port = free_port(), free_port()
    env = dict(os.environ, **{auth.TOKENS_ENV: ENV_TOKEN})
    up = subprocess.Popen([sys.executable, "-m", "stack.cli", "up", "--model", str(tiny_model), "--port", str(port),
                           "--http-port", str(http_port), "--tls-dir", str(certs), "--api-tokens-file",
                           str(tokens_file), "--log-level", "WARNING"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = up.stdout.readline()  # blocks until every service is healthy over mTLS (or the launcher exits)
        assert f"router listening on 127.0.0.1:{port}" in line, line
        yield SecureStack(f"127.0.0.1:{port}", http_port, certs, tokens_file, *_children(up))
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)


class _Authorized:
    """A Router stub that sends a bearer token (for tests.integration.helpers.collect)."""

    def __init__(self, channel: grpc.Channel, token: str | None):
        self.stub, self.token = api_pb2_grpc.RouterStub(channel), token

    def Generate(self, req, timeout):
        metadata = (("authorization", f"Bearer {self.token}"),) if self.token else None
        return self.stub.Generate(req, timeout=timeout, metadata=metadata)


# --- gRPC: tokens and TLS on the public port ------------------------------------------------------------------

def test_an_image_request_over_tls_and_mtls_equals_transformers(secure, tiny_model):
    req = request(image(make_image(width=96, height=80, seed=3)), text("What is in the picture?"), num_tokens=8)
    with secure.channel() as channel:
        result = collect(_Authorized(channel, FILE_TOKEN), req)
        assert collect(_Authorized(channel, ENV_TOKEN), req).token_ids == result.token_ids
    assert result.final.completion_tokens == 8
    assert result.token_ids == Reference(tiny_model).generate(req, 8)


@pytest.mark.parametrize("token, message", [(None, "missing bearer token"), ("sk-wrong", "invalid bearer token"),
                                            (FILE_TOKEN + "x", "invalid bearer token")])
def test_a_missing_or_wrong_token_is_unauthenticated(secure, token, message):
    with secure.channel() as channel, pytest.raises(grpc.RpcError) as info:
        collect(_Authorized(channel, token), request(text("hello"), num_tokens=2))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details() == message  # never which tokens exist


def test_a_plaintext_client_gets_no_answer_from_the_tls_port(secure):
    with grpc.insecure_channel(secure.address) as channel, pytest.raises(grpc.RpcError) as info:
        collect(_Authorized(channel, FILE_TOKEN), request(text("hello"), num_tokens=2), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_needs_no_token_and_the_probe_speaks_tls(secure):
    with secure.channel() as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=ROUTER_SERVICE),
                                                          timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    probe = [sys.executable, "-m", "mmserve.probe", secure.address]
    ok = subprocess.run([*probe, "--tls-ca-file", str(secure.certs / "ca.pem")], capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stderr
    plaintext = subprocess.run([*probe, "--timeout", "5"], capture_output=True, text=True, timeout=60)
    assert plaintext.returncode == 1


def test_generate_cli_sends_the_token_from_a_file_or_the_environment(secure):
    argv = [sys.executable, "-m", "stack.cli", "generate", "--addr", secure.address, "--prompt", "Hi",
            "--max-tokens", "3", "--tls-ca-file", str(secure.certs / "ca.pem")]
    env = {k: v for k, v in os.environ.items() if k != auth.CLIENT_TOKEN_ENV}
    by_file = subprocess.run([*argv, "--token-file", str(secure.tokens_file)], capture_output=True, text=True,
                             timeout=120, env=env)
    assert by_file.returncode == 0 and "completion_tokens=3" in by_file.stdout, by_file.stderr
    by_env = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                            env=dict(env, **{auth.CLIENT_TOKEN_ENV: ENV_TOKEN}))
    assert by_env.returncode == 0 and "completion_tokens=3" in by_env.stdout, by_env.stderr
    without = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert without.returncode == 1 and "UNAUTHENTICATED: missing bearer token" in without.stderr


# --- mutual TLS between the services ----------------------------------------------------------------------------

def test_every_stage_refuses_a_client_without_a_certificate(secure, tmp_path):
    assert set(secure.stage_addresses) == set(STAGES)
    stranger = tls.make_dev_certs(tmp_path / "stranger")  # a valid certificate from a CA the stages do not trust
    ca = str(secure.certs / "ca.pem")
    ours = tls.ClientTls(ca, str(secure.certs / "client.pem"), str(secure.certs / "client.key"))
    for stage, address in secure.stage_addresses.items():
        assert tls_probe(address, ours) == (0, f"{address}: SERVING"), stage
        for refused in (None, tls.ClientTls(ca),
                        tls.ClientTls(ca, str(stranger / "client.pem"), str(stranger / "client.key"))):
            code, why = tls_probe(address, refused)
            assert code == 1 and "UNAVAILABLE" in why, (stage, refused, why)


def tls_probe(address: str, client_tls: tls.ClientTls | None) -> tuple[int, str]:
    """`python -m mmserve.probe` with the client's TLS flags: (exit code, what it printed)."""
    argv = [sys.executable, "-m", "mmserve.probe", address, "--timeout", "10"]
    if client_tls is not None:
        argv += ["--tls-ca-file", client_tls.ca_file]
        if client_tls.cert_file:
            argv += ["--tls-cert-file", client_tls.cert_file, "--tls-key-file", client_tls.key_file]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return done.returncode, (done.stdout + done.stderr).strip()


# --- the OpenAI-compatible API over HTTPS ---------------------------------------------------------------------

def _openai(secure: SecureStack, api_key: str) -> openai.OpenAI:
    context = ssl.create_default_context(cafile=str(secure.certs / "ca.pem"))
    return openai.OpenAI(base_url=f"https://127.0.0.1:{secure.http_port}/v1", api_key=api_key, max_retries=0,
                         timeout=120, http_client=openai.DefaultHttpxClient(verify=context))


def test_openai_client_with_the_token_is_served_over_https(secure, tiny_model):
    client = _openai(secure, FILE_TOKEN)
    assert [m.id for m in client.models.list().data] == [tiny_model.name]
    reply = client.chat.completions.create(model=tiny_model.name, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4, temperature=0, extra_body={"min_tokens": 4})
    assert reply.usage.completion_tokens == 4


def test_openai_client_with_a_wrong_token_gets_401(secure, tiny_model):
    client = _openai(secure, "sk-wrong")
    with pytest.raises(openai.AuthenticationError) as info:
        client.models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=tiny_model.name, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=2)


@pytest.mark.parametrize("path, body", [("/v1/models", None), ("/v1/chat/completions", b"{}")])
def test_a_request_without_authorization_gets_401_in_openai_shape(secure, path, body):
    context = ssl.create_default_context(cafile=str(secure.certs / "ca.pem"))
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(f"https://127.0.0.1:{secure.http_port}{path}", data=body),
                               context=context, timeout=30)
    assert info.value.code == 401 and info.value.headers["WWW-Authenticate"] == "Bearer"
    assert json.load(info.value) == {"error": {"message": "missing bearer token", "type": "invalid_request_error",
                                               "param": None, "code": "invalid_api_key"}}


def test_http_health_stays_open_and_plain_http_is_refused(secure):
    context = ssl.create_default_context(cafile=str(secure.certs / "ca.pem"))
    with urllib.request.urlopen(f"https://127.0.0.1:{secure.http_port}/health", context=context, timeout=30) as r:
        assert r.status == 200 and json.load(r) == {"status": "serving"}
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{secure.http_port}/health", timeout=30)


# --- the HTTP layer over plain HTTP, on an in-process router ---------------------------------------------------

class _EchoRouter(api_pb2_grpc.RouterServicer):
    async def Generate(self, request, context):
        yield api_pb2.GenerateResponse(delta=api_pb2.Delta(text="hi"))
        yield api_pb2.GenerateResponse(final=api_pb2.Final(finish_reason="stop", completion_tokens=1))


async def test_plain_http_checks_tokens_and_reaches_the_router_over_its_private_socket(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{FILE_TOKEN}\n")
    config = RouterConfig(model="echo", decoder_addrs="x:1", encoder_addrs="x:2", llm_addrs="x:3",
                          http_port=free_port(), served_model_name="echo", api_tokens_file=str(tokens))
    service = rpc.Service(config, [ROUTER_SERVICE])
    api_pb2_grpc.add_RouterServicer_to_server(_EchoRouter(), service.server)
    local = service.add_local_port()
    assert re.fullmatch(r"unix:/.+/grpc\.sock", local)
    http = OpenAiServer(config, local)
    await http.start()
    port = await service.start()
    http.connect(port)
    base = f"http://127.0.0.1:{config.http_port}/v1"
    try:
        assert os.stat(local.removeprefix("unix:")).st_uid == os.getuid()
        assert oct(os.stat(os.path.dirname(local.removeprefix("unix:"))).st_mode & 0o777) == "0o700"
        good = openai.AsyncOpenAI(base_url=base, api_key=FILE_TOKEN, max_retries=0, timeout=30)
        reply = await good.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
        assert reply.choices[0].message.content == "hi"
        bad = openai.AsyncOpenAI(base_url=base, api_key="sk-nope", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.models.list()
        assert info.value.body["message"] == "invalid bearer token"
        await good.close()
        await bad.close()
    finally:
        await http.close()
        await service.stop()
    assert not os.path.exists(os.path.dirname(local.removeprefix("unix:")))  # the private directory is gone


# --- rotation -----------------------------------------------------------------------------------------------------

def _accepts(secure: SecureStack, token: str) -> tuple[bool, bool]:
    """Whether the gRPC API and the HTTP API accept token."""
    with secure.channel() as channel:
        try:
            collect(_Authorized(channel, token), request(text("hi"), num_tokens=1))
            grpc_ok = True
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            grpc_ok = False
    try:
        _openai(secure, token).models.list()
        http_ok = True
    except openai.AuthenticationError:
        http_ok = False
    return grpc_ok, http_ok


def _wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + 60  # a hang guard: SIGHUP is handled within a moment
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_sighup_rotates_the_tokens_of_both_apis_without_a_restart(secure):
    new, original = "sk-rotated-in", secure.tokens_file.read_text()
    assert _accepts(secure, new) == (False, False)
    try:
        secure.tokens_file.write_text(original + new + "\n")
        os.kill(secure.router_pid, signal.SIGHUP)
        _wait_until(lambda: _accepts(secure, new) == (True, True), "the new token was never accepted")
    finally:
        secure.tokens_file.write_text(original)
        os.kill(secure.router_pid, signal.SIGHUP)
    _wait_until(lambda: _accepts(secure, new) == (False, False), "the removed token is still accepted")
    assert _accepts(secure, FILE_TOKEN) == _accepts(secure, ENV_TOKEN) == (True, True)
