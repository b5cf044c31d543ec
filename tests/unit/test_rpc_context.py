"""Every call of one request message runs with its request id (for the log lines) and its caller's shared-memory
domain set, and no call sees another's."""

from __future__ import annotations

import asyncio

import grpc

from mmserve import rpc, transport
from mmserve.config import ServiceConfig
from mmserve.v1 import api_pb2, api_pb2_grpc

ROUTER = api_pb2.DESCRIPTOR.services_by_name["Router"].full_name


class _ContextRouter(api_pb2_grpc.RouterServicer):
    """Answers with the request id and the caller's domain its call runs with."""

    async def Generate(self, request, context):
        await asyncio.sleep(0.05)  # both calls in flight at once
        seen = f"{rpc.request_id.get()}|{transport.caller_domain.get()}"
        yield api_pb2.GenerateResponse(delta=api_pb2.Delta(text=seen))


async def _case() -> list[str]:
    service = rpc.Service(ServiceConfig(), [ROUTER])
    api_pb2_grpc.add_RouterServicer_to_server(_ContextRouter(), service.server)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = api_pb2_grpc.RouterStub(channel)

            async def text(request_id: str, domain: str) -> str:
                metadata = ((transport.CALLER_DOMAIN_HEADER, domain),) if domain else ()
                call = stub.Generate(api_pb2.GenerateRequest(request_id=request_id), metadata=metadata, timeout=10)
                return [reply.delta.text async for reply in call][0]

            return await asyncio.gather(text("req-a", "host-a"), text("req-b", ""), text("bad\nid", ""))
    finally:
        await service.stop()


def test_each_call_runs_with_its_own_request_id_and_caller_domain():
    a, b, bad = asyncio.run(_case())
    default_domain = transport.caller_domain.get()
    assert a == "req-a|host-a"
    assert b == f"req-b|{default_domain}"
    assert bad.startswith("invalid:")  # never written raw to a log line
