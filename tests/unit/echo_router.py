"""A stand-in Router for the load-test clients' tests: answers "hello" behind TLS and bearer tokens."""

from __future__ import annotations

import contextlib
import dataclasses

from mmserve import rpc
from mmserve.config import AuthOptions, ServiceConfig
from mmserve.v1 import api_pb2, api_pb2_grpc

_ROUTER = api_pb2.DESCRIPTOR.services_by_name["Router"].full_name


@dataclasses.dataclass(frozen=True)
class _RouterConfig(ServiceConfig, AuthOptions):
    pass


class _EchoRouter(api_pb2_grpc.RouterServicer):
    async def Generate(self, request, context):
        yield api_pb2.GenerateResponse(delta=api_pb2.Delta(text="hello"))


@contextlib.asynccontextmanager
async def echo_router(certs, token_file):
    """Its address while it serves: TLS with certs (`mmserve certs` names), the bearer tokens in token_file."""
    service = rpc.Service(_RouterConfig(tls_cert_file=str(certs / "server.pem"), tls_key_file=str(certs / "server.key"),
                                        api_tokens_file=str(token_file)), [_ROUTER])
    api_pb2_grpc.add_RouterServicer_to_server(_EchoRouter(), service.server)
    try:
        yield f"127.0.0.1:{await service.start()}"
    finally:
        await service.stop()
