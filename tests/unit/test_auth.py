"""Bearer tokens (files, environment, constant-time check), TLS settings and the token interceptor on a real server."""

from __future__ import annotations

import asyncio

import grpc
import prometheus_client
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmserve import auth, rpc, tls
from mmserve.config import ServiceConfig
from stack.launcher import TLS_FILES, StackSpec, plan, tls_dir_error, tls_settings
from mmserve.v1 import api_pb2, api_pb2_grpc
from services.decoder.config import DecoderConfig
from services.router.config import RouterConfig
from tests.unit.echo_router import ROUTER, PublicConfig, serve


# --- tokens ----------------------------------------------------------------------------------------------------


def test_tokens_file_skips_comments_and_blank_lines():
    text = "# production keys\n\nsk-alpha\n   sk-beta  \n# sk-retired\nQUJD+/x_y.z~w==\n"
    assert auth.parse_tokens_file(text, "keys") == ["sk-alpha", "sk-beta", "QUJD+/x_y.z~w=="]


@pytest.mark.parametrize("line", ["two tokens", "sk-é", "Bearer\tx", "a,b"])
def test_a_line_that_is_no_token_is_refused_without_echoing_it(line):
    with pytest.raises(ValueError, match=r"^keys:2: not a bearer token") as info:
        auth.parse_tokens_file(f"ok\n{line}\n", "keys")
    assert line not in str(info.value)


def test_tokens_come_from_the_file_and_the_environment(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("file-token\n")
    assert auth.load_tokens(str(path), {auth.TOKENS_ENV: " env-1, env-2 ,"}) == {"file-token", "env-1", "env-2"}
    assert auth.load_tokens("", {auth.TOKENS_ENV: "env-1"}) == {"env-1"}
    assert auth.load_tokens("", {}) == frozenset()  # no tokens: the API stays open


def test_a_named_file_without_tokens_or_unreadable_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="api_tokens_file: .* holds no token"):
        auth.load_tokens(str(empty), {})
    with pytest.raises(ValueError, match="api_tokens_file: cannot read"):
        auth.load_tokens(str(tmp_path / "absent"), {})
    with pytest.raises(ValueError, match=f"{auth.TOKENS_ENV}: entry 2 is not a bearer token"):
        auth.load_tokens("", {auth.TOKENS_ENV: "good,bad token"})


@pytest.mark.parametrize("header, token", [("Bearer abc", "abc"), ("bearer abc", "abc"), ("BEARER abc", "abc"),
                                           ("Basic abc", None), ("Bearer", None), ("Bearer ", None), ("", None),
                                           (None, None), ("abc", None)])
def test_bearer_token_of_a_header(header, token):
    assert auth.bearer_token(header) == token


@pytest.mark.parametrize("header", ["BEARER  abc ", "Bearer  abc", "Bearer abc ", " Bearer abc", "Bearer\tabc",
                                    "Bearer abc def", "Bearer abc,Bearer def", "Bearer abc\n", "Bearerabc"])
def test_bearer_parsing_is_strict(header):  # one space, the token, nothing else
    assert auth.bearer_token(header) is None
    assert auth.TokenChecker({"abc"}).refusal(header) is not None


def test_two_authorization_headers_are_refused_even_when_both_are_valid():
    checker = auth.TokenChecker({"sk-one", "sk-two"})
    assert checker.headers_refusal(["Bearer sk-one"]) is None and checker.headers_refusal([]) == auth.MISSING
    assert checker.headers_refusal(["Bearer sk-one", "Bearer sk-two"]) == auth.DUPLICATE
    assert checker.headers_refusal(["Bearer sk-one", "Bearer sk-one"]) == auth.DUPLICATE
    assert auth.TokenChecker(frozenset()).headers_refusal(["a", "b"]) is None  # no tokens: open


def test_checker_answers_missing_invalid_or_pass():
    checker = auth.TokenChecker({"sk-one", "sk-two"})
    assert checker.is_enabled
    assert checker.refusal("Bearer sk-two") is None and checker.refusal("bearer sk-one") is None
    assert checker.refusal(None) == checker.refusal("Basic sk-one") == auth.MISSING
    for wrong in ("Bearer sk-on", "Bearer sk-one2", "Bearer SK-ONE", "Bearer sk-one sk-two"):
        assert checker.refusal(wrong) == auth.INVALID
    assert auth.MISSING == "missing bearer token" and "sk-" not in auth.INVALID


def test_checker_without_tokens_lets_everything_pass():
    checker = auth.TokenChecker(frozenset())
    assert not checker.is_enabled and checker.refusal(None) is None and checker.refusal("Bearer x") is None


def test_client_token_from_a_file_or_the_environment(tmp_path):
    path = tmp_path / "token"
    path.write_text("# mine\nsk-client\nsk-other\n")
    assert auth.client_token(str(path), {auth.CLIENT_TOKEN_ENV: "ignored"}) == "sk-client"
    assert auth.client_token("", {auth.CLIENT_TOKEN_ENV: " sk-env "}) == "sk-env"
    assert auth.client_token("", {}) is None
    with pytest.raises(ValueError, match="--token-file: cannot read"):
        auth.client_token(str(tmp_path / "absent"), {})


# --- TLS settings ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"tls_cert_file": "c.pem"}, "tls_cert_file: needs tls_key_file too"),
    ({"tls_key_file": "k.pem"}, "tls_key_file: needs tls_cert_file too"),
    ({"tls_ca_file": "ca.pem", "tls_client_cert_file": "c.pem"}, "tls_client_cert_file: needs tls_client_key_file"),
    ({"tls_ca_file": "ca.pem", "tls_client_key_file": "k.pem"}, "tls_client_key_file: needs tls_client_cert_file"),
    ({"tls_client_ca_file": "ca.pem"}, "tls_client_ca_file: needs tls_cert_file"),
    ({"tls_client_cert_file": "c.pem", "tls_client_key_file": "k.pem"}, "tls_client_cert_file: needs tls_ca_file"),
    ({"tls_server_name": "mmserve.internal"}, "tls_server_name: needs tls_ca_file"),
])
def test_tls_settings_without_their_partner_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        DecoderConfig(**fields)


def test_tls_flags_are_file_paths_on_every_service():
    config = DecoderConfig.parse(["--tls-cert-file", "/tls/server.pem", "--tls-key-file", "/tls/server.key",
                                  "--tls-client-ca-file", "/tls/ca.pem"])
    assert (config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file) == (
        "/tls/server.pem", "/tls/server.key", "/tls/ca.pem")
    assert tls.client_tls(config) is None  # serving TLS says nothing about the channels it opens
    router = RouterConfig.parse(["--model", "/m", "--decoder-addrs", "d:1", "--encoder-addrs", "e:1",
                                 "--llm-addrs", "l:1", "--api-tokens-file", "/run/secrets/tokens",
                                 "--tls-ca-file", "/tls/ca.pem", "--tls-client-cert-file", "/tls/client.pem",
                                 "--tls-client-key-file", "/tls/client.key"])
    assert router.api_tokens_file == "/run/secrets/tokens"
    assert tls.client_tls(router) == tls.ClientTls("/tls/ca.pem", "/tls/client.pem", "/tls/client.key")
    assert not hasattr(DecoderConfig(), "api_tokens_file")  # tokens guard the public API only


def test_unreadable_or_non_pem_files_name_the_setting(tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ValueError, match="tls_key_file: cannot read"):
        tls.server_credentials(DecoderConfig(tls_cert_file=str(junk), tls_key_file=str(tmp_path / "absent")))
    with pytest.raises(ValueError, match="tls_ca_file: .* is not a PEM file"):
        tls.ClientTls(str(junk)).credentials()


def test_dev_certs_have_the_up_layout_and_private_keys(certs):
    assert sorted(p.name for p in certs.iterdir()) == sorted(TLS_FILES)
    assert (certs / "server.key").stat().st_mode & 0o777 == 0o600


def test_up_plans_mutual_tls_inside_and_tls_on_the_public_port(certs, tmp_path):
    children = plan(StackSpec(model="/m", redis_url="redis://127.0.0.1:1/0", tls_dir=str(certs),
                              api_tokens_file="/run/tokens")).children()
    by_name = {c.name: c for c in children}
    assert set(by_name) == {"decoder", "encoder", "llm", "router"}
    for name in ("decoder", "encoder", "llm"):
        argv = by_name[name].argv
        assert argv[argv.index("--tls-client-ca-file") + 1] == str(certs / "ca.pem"), name
        assert argv[argv.index("--tls-client-cert-file") + 1] == str(certs / "client.pem"), name  # tensor pulls
        assert "--api-tokens-file" not in argv
    router = by_name["router"].argv
    assert router[router.index("--tls-client-ca-file") + 1] == ""  # public clients need no certificate
    assert router[router.index("--tls-client-cert-file") + 1] == str(certs / "client.pem")
    assert router[router.index("--api-tokens-file") + 1] == "/run/tokens"
    assert all(c.client_tls == tls.ClientTls(str(certs / "ca.pem"), str(certs / "client.pem"),
                                             str(certs / "client.key")) for c in children)
    assert tls_dir_error(str(certs)) is None and tls_dir_error("") is None
    assert tls_dir_error(str(tmp_path)) == (f"--tls-dir {tmp_path}: missing {', '.join(TLS_FILES)} (`mmserve certs "
                                            f"--out {tmp_path}` writes a development set)")
    assert tls_settings("/absent")[2] == tls.ClientTls("/absent/ca.pem", "/absent/client.pem", "/absent/client.key")


# --- the interceptor on a real server ----------------------------------------------------------------------------

def _refusals(reason: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value("mmserve_auth_refusals_total", {"reason": reason}) or 0.0


async def _generate(channel, metadata=None) -> list[str]:
    stub = api_pb2_grpc.RouterStub(channel)
    return [r.delta.text async for r in stub.Generate(api_pb2.GenerateRequest(), metadata=metadata, timeout=30)]


async def test_tokens_guard_the_public_service_but_not_health(tmp_path, monkeypatch):
    tokens = tmp_path / "tokens"
    tokens.write_text("sk-file\n")
    monkeypatch.setenv(auth.TOKENS_ENV, "sk-env")
    service = await serve(PublicConfig(api_tokens_file=str(tokens)))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            assert await _generate(channel, (("authorization", "Bearer sk-file"),)) == ["hello"]
            assert await _generate(channel, (("authorization", "Bearer sk-env"),)) == ["hello"]
            before = _refusals("missing"), _refusals("invalid")
            for metadata, message in ((None, "missing bearer token"),
                                      ((("authorization", "Bearer sk-nope"),), "invalid bearer token")):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await _generate(channel, metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert info.value.details() == message
            assert (_refusals("missing"), _refusals("invalid")) == (before[0] + 1, before[1] + 1)
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=ROUTER),
                                                                     timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await service.stop()


async def test_without_tokens_the_api_is_open_and_a_service_without_auth_ignores_the_env(monkeypatch):
    monkeypatch.setenv(auth.TOKENS_ENV, "sk-env")
    service = await serve(ServiceConfig())  # not a public service: no AuthOptions, the variable is not read
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            assert await _generate(channel) == ["hello"]
    finally:
        await service.stop()


async def test_a_named_empty_tokens_file_fails_start_up(tmp_path):
    empty = tmp_path / "tokens"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no token"):
        rpc.Service(PublicConfig(api_tokens_file=str(empty)), [ROUTER])


async def test_a_service_installs_its_client_tls_for_channels_opened_deep_inside(certs):  # the server needs a loop
    config = ServiceConfig(tls_ca_file=str(certs / "ca.pem"), tls_client_cert_file=str(certs / "client.pem"),
                           tls_client_key_file=str(certs / "client.key"))
    try:
        rpc.Service(config, [ROUTER])
        assert tls.installed_client() == tls.ClientTls(str(certs / "ca.pem"), str(certs / "client.pem"),
                                                       str(certs / "client.key"))
    finally:
        tls.install_client(None)


# --- TLS and mutual TLS on a real server ---------------------------------------------------------------------------

def _tls_config(certs, **extra) -> ServiceConfig:
    return ServiceConfig(tls_cert_file=str(certs / "server.pem"), tls_key_file=str(certs / "server.key"), **extra)


async def test_a_tls_port_answers_a_client_with_the_ca_and_refuses_plaintext(certs):
    service = await serve(_tls_config(certs))
    address = f"127.0.0.1:{service.port}"
    try:
        async with rpc.channel(address, 1 << 20, tls.ClientTls(str(certs / "ca.pem"))) as channel:
            assert await _generate(channel) == ["hello"]
        await rpc.wait_healthy(address, 30, client_tls=tls.ClientTls(str(certs / "ca.pem")))
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _generate(channel)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await service.stop()


async def test_mutual_tls_refuses_a_client_without_a_certificate(certs, tmp_path):
    service = await serve(_tls_config(certs, tls_client_ca_file=str(certs / "ca.pem")))
    address = f"127.0.0.1:{service.port}"
    other = tls.make_dev_certs(tmp_path / "other")  # a certificate from a CA the server does not trust
    try:
        full = tls.ClientTls(str(certs / "ca.pem"), str(certs / "client.pem"), str(certs / "client.key"))
        async with rpc.channel(address, 1 << 20, full) as channel:
            assert await _generate(channel) == ["hello"]
        untrusted = tls.ClientTls(str(certs / "ca.pem"), str(other / "client.pem"), str(other / "client.key"))
        for client_tls in (tls.ClientTls(str(certs / "ca.pem")), untrusted):
            async with rpc.channel(address, 1 << 20, client_tls) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await _generate(channel)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await service.stop()


# --- rotation ------------------------------------------------------------------------------------------------------

def test_reload_rotates_tokens_and_never_opens_the_api(tmp_path, monkeypatch):
    monkeypatch.delenv(auth.TOKENS_ENV, raising=False)
    path = tmp_path / "tokens"
    path.write_text("sk-old\n")
    checker = auth.shared_checker(str(path))
    assert auth.shared_checker(str(path)) is checker  # the gRPC and HTTP APIs share it
    assert checker.refusal("Bearer sk-old") is None
    path.write_text("sk-new\n")
    auth.reload_tokens()
    assert checker.refusal("Bearer sk-old") == auth.INVALID and checker.refusal("Bearer sk-new") is None
    for broken in ("# emptied by mistake\n", "not one token\n"):
        path.write_text(broken)
        auth.reload_tokens()
        assert checker.refusal("Bearer sk-new") is None, broken  # the previous tokens stay
    path.unlink()
    auth.reload_tokens()
    assert checker.refusal("Bearer sk-new") is None and checker.refusal(None) == auth.MISSING


async def test_remote_tensor_pulls_present_the_process_certificate(certs):
    import torch

    from mmserve.transport import TensorUnavailable, remote
    from mmserve.v1 import tensor_pb2

    def mtls(with_client: bool) -> ServiceConfig:
        client = dict(tls_ca_file=str(certs / "ca.pem"), tls_client_cert_file=str(certs / "client.pem"),
                      tls_client_key_file=str(certs / "client.key")) if with_client else {}
        return _tls_config(certs, tls_client_ca_file=str(certs / "ca.pem"), **client)

    tensor = torch.arange(3 * 1024 * 1024, dtype=torch.uint8)  # several 1 MiB chunks
    try:
        for with_client in (True, False):
            service = await serve(mtls(with_client))  # installs its client TLS (or none) for the process
            try:
                ref = tensor_pb2.RemoteRef(address=f"127.0.0.1:{service.port}", handle_id=service.store.hold(tensor),
                                           nbytes=tensor.numel())
                out = torch.empty(tensor.numel(), dtype=torch.uint8)
                if with_client:
                    await remote.pull_into(ref, out, timeout_s=30)
                    assert torch.equal(out, tensor)
                else:
                    with pytest.raises(TensorUnavailable, match="UNAVAILABLE"):
                        await remote.pull_into(ref, out, timeout_s=30)
            finally:
                await service.stop()
    finally:
        tls.install_client(None)


async def test_probe_reaches_a_server_whose_certificate_names_another_host(tmp_path):
    from mmserve import probe

    named = tls.make_dev_certs(tmp_path / "named", names=("decoder",))  # as in a container, probed on 127.0.0.1
    service = await serve(_tls_config(named))
    address = f"127.0.0.1:{service.port}"
    try:
        args = probe.build_parser().parse_args([address, "--tls-ca-file", str(named / "ca.pem"), "--timeout", "10"])
        serving, why = await asyncio.to_thread(probe.check, address, "", 10, tls.client_tls_from_args(args))
        assert not serving and "UNAVAILABLE" in why
        args = probe.build_parser().parse_args([address, "--tls-ca-file", str(named / "ca.pem"),
                                                "--tls-server-name", "decoder"])
        assert await asyncio.to_thread(probe.check, address, "", 10, tls.client_tls_from_args(args)) == (
            True, f"{address}: SERVING")
    finally:
        await service.stop()


async def test_a_service_reaches_peers_by_ip_through_the_name_their_certificate_carries(tmp_path):
    named = tls.make_dev_certs(tmp_path / "named", names=("mmserve.internal",))  # as on Kubernetes: pod IPs
    service = await serve(_tls_config(named, tls_client_ca_file=str(named / "ca.pem")))
    address = f"127.0.0.1:{service.port}"
    calling = dict(tls_ca_file=str(named / "ca.pem"), tls_client_cert_file=str(named / "client.pem"),
                   tls_client_key_file=str(named / "client.key"))
    try:
        async with rpc.channel(address, 1 << 20, tls.client_tls(ServiceConfig(**calling))) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:  # 127.0.0.1 is not a name the certificate carries
                await _generate(channel)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        config = ServiceConfig.parse([*(f"--{k.replace('_', '-')}={v}" for k, v in calling.items()),
                                      "--tls-server-name", "mmserve.internal"])
        assert tls.client_tls(config).server_name == "mmserve.internal"
        async with rpc.channel(address, 1 << 20, tls.client_tls(config)) as channel:
            assert await _generate(channel) == ["hello"]
    finally:
        await service.stop()
