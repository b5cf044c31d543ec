"""The internal token on a real server: stage ports require it (health stays open), the router's public API keeps its
own tokens, our channels send it; a stage refuses a non-loopback host without a credential; strict gRPC headers."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mmserve import internal_token, rpc, tls
from mmserve.config import ServiceConfig
from mmserve.transport import remote
from mmserve.v1 import api_pb2, api_pb2_grpc, tensor_pb2
from services.decoder.config import DecoderConfig
from tests.unit.echo_router import ROUTER, PublicConfig, serve

TOKEN = "internal-secret"


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "internal-token"
    path.write_text(TOKEN + "\n")
    yield str(path)
    internal_token.install(None)  # a Service installs it process-wide, as it does the client TLS
    tls.install_client(None)


async def _generate(channel, metadata=None) -> list[str]:
    stub = api_pb2_grpc.RouterStub(channel)
    return [r.delta.text async for r in stub.Generate(api_pb2.GenerateRequest(), metadata=metadata, timeout=30)]


async def _release(channel, metadata=None) -> int:
    call = channel.unary_unary(f"/{remote.SERVICE}/Release", tensor_pb2.ReleaseRequest.SerializeToString,
                               tensor_pb2.ReleaseResponse.FromString)
    return (await call(tensor_pb2.ReleaseRequest(handle_ids=["absent"]), metadata=metadata, timeout=30)).num_released


async def _list_services(channel, metadata=None) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                        metadata=metadata, timeout=30)
    return [s.name async for reply in replies for s in reply.list_services_response.service]


async def _refused(call, metadata) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(metadata)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    return info.value.details()


async def _health(channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    return reply.status


async def test_a_stage_port_takes_only_the_internal_token_and_health_stays_open(token_file):
    service = await serve(ServiceConfig(internal_token_file=token_file))  # no AuthOptions: a stage
    own = ((internal_token.HEADER, TOKEN),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            for call in (lambda m: _generate(channel, m), lambda m: _release(channel, m),
                         lambda m: _list_services(channel, m)):
                assert await _refused(call, None) == internal_token.MISSING
                assert await _refused(call, ((internal_token.HEADER, "wrong"),)) == internal_token.INVALID
                assert await _refused(call, own + own) == internal_token.DUPLICATE
                assert await _refused(call, (("authorization", f"Bearer {TOKEN}"),)) == internal_token.MISSING
            assert await _generate(channel, own) == ["hello"]
            assert await _release(channel, own) == 0
            assert ROUTER in await _list_services(channel, own)
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await service.stop()


async def test_our_channels_send_the_installed_token(token_file):
    service = await serve(ServiceConfig(internal_token_file=token_file))  # installs the token for this process
    address = f"127.0.0.1:{service.port}"
    try:
        async with rpc.channel(address, 4 << 20) as channel:  # the router's channels to its replicas
            assert await _generate(channel) == ["hello"]
        assert await _release(remote._channel(address)) == 0  # remote tensor pulls and releases
    finally:
        await service.stop()
    internal_token.install(None)
    async with rpc.channel(address, 4 << 20) as channel:
        assert internal_token.client_interceptors() == []  # none installed: plain channels, as before


async def test_the_public_port_keeps_api_tokens_and_guards_its_tensor_store(token_file, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("sk-client\n")
    service = await serve(PublicConfig(api_tokens_file=str(tokens), internal_token_file=token_file))
    client = (("authorization", "Bearer sk-client"),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            assert await _generate(channel, client) == ["hello"]  # a client needs no internal token
            assert ROUTER in await _list_services(channel)
            assert await _refused(lambda m: _release(channel, m), client) == internal_token.MISSING
            assert await _release(channel, ((internal_token.HEADER, TOKEN),)) == 0
            two = client + (("authorization", "Bearer sk-client"),)
            assert await _refused(lambda m: _generate(channel, m), two) == "more than one authorization header"
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await service.stop()


def test_a_stage_on_a_non_loopback_host_needs_a_credential(certs, token_file):
    for host in ("0.0.0.0", "", "10.0.0.5", "decoder", "::"):
        with pytest.raises(ValueError, match="^host: .* needs internal_token_file or mutual TLS"):
            DecoderConfig(host=host)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        DecoderConfig(host=host)
    DecoderConfig(host="0.0.0.0", internal_token_file=token_file)
    DecoderConfig(host="0.0.0.0", tls_cert_file=str(certs / "server.pem"), tls_key_file=str(certs / "server.key"),
                  tls_client_ca_file=str(certs / "ca.pem"))
    PublicConfig(host="0.0.0.0")  # a public API (the router): its own tokens and TLS


@pytest.mark.parametrize("text, message", [("", "one secret on one line"), ("two words", "one secret on one line"),
                                           ("tok\u00e9n", "is not a token")])
def test_a_bad_internal_token_file_fails_start_up_without_echoing_it(tmp_path, text, message):
    path = tmp_path / "token"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^internal_token_file: .*{message}") as info:
        rpc.Service(ServiceConfig(internal_token_file=str(path)), [ROUTER])
    assert not text or text not in str(info.value)
    with pytest.raises(ValueError, match="internal_token_file: cannot read"):
        internal_token.load(str(tmp_path / "absent"))
