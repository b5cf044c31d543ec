"""A stand-in public Router that answers "hello", for the tests of authentication and of the load-test clients."""

from __future__ import annotations

import contextlib
import dataclasses

from mmserve import rpc
from mmserve.config import AuthOptions, ServiceConfig
from mmserve.v1 import api_pb2, api_pb2_grpc

ROUTER = api_pb2.DESCRIPTOR.services_by_name["Router"].full_name


@dataclasses.dataclass(frozen=True)
class PublicConfig(ServiceConfig, AuthOptions):
    """A service config with the public API's bearer tokens."""


class _EchoRouter(api_pb2_grpc.RouterServicer):
    async def Generate(self, request, context):
        yield api_pb2.GenerateResponse(delta=api_pb2.Delta(text="hello"))


async def serve(config: ServiceConfig) -> rpc.Service:
    """The stand-in Router, started with config (TLS, tokens) on a free port."""
    service = rpc.Service(config, [ROUTER])
    api_pb2_grpc.add_RouterServicer_to_server(_EchoRouter(), service.server)
    await service.start()
    return service


@contextlib.asynccontextmanager
async def echo_router(certs, token_file):
    """Its address while it serves: TLS with certs (`mmserve certs` names), the bearer tokens in token_file."""
    service = await serve(PublicConfig(tls_cert_file=str(certs / "server.pem"), tls_key_file=str(certs / "server.key"),
                                       api_tokens_file=str(token_file)))
    try:
        yield f"127.0.0.1:{service.port}"
    finally:
        await service.stop()
