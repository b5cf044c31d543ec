"""A server at its limit of calls in flight refuses one more with RESOURCE_EXHAUSTED and a retry-after-ms, and keeps
answering health checks; every place a call held comes back when it ends, however it ends."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmserve import rpc
from mmserve.config import ServiceConfig
from mmserve.v1 import api_pb2, api_pb2_grpc

ROUTER = api_pb2.DESCRIPTOR.services_by_name["Router"].full_name


class _HeldRouter(api_pb2_grpc.RouterServicer):
    """Answers "started", then holds the call until released."""

    def __init__(self):
        self.release = asyncio.Event()

    async def Generate(self, request, context):
        yield api_pb2.GenerateResponse(delta=api_pb2.Delta(text="started"))
        await self.release.wait()
        yield api_pb2.GenerateResponse(delta=api_pb2.Delta(text="done"))


async def _started(stub) -> grpc.aio.UnaryStreamCall:
    call = stub.Generate(api_pb2.GenerateRequest(), timeout=30)
    assert (await call.read()).delta.text == "started"
    return call


async def _rest(call: grpc.aio.UnaryStreamCall) -> list[str]:
    texts = []
    while (reply := await call.read()) is not grpc.aio.EOF:
        texts.append(reply.delta.text)
    return texts


async def _refusal(stub) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _started(stub)
    return info.value


async def _limit_case():
    servicer = _HeldRouter()
    service = rpc.Service(ServiceConfig(max_concurrent_rpcs=2), [ROUTER])
    api_pb2_grpc.add_RouterServicer_to_server(servicer, service.server)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub, health = api_pb2_grpc.RouterStub(channel), health_pb2_grpc.HealthStub(channel)
            held = [await _started(stub), await _started(stub)]
            err = await _refusal(stub)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit" in err.details() and "max_concurrent_rpcs" in err.details()
            assert dict(err.trailing_metadata())[rpc.RETRY_AFTER_HEADER] == str(rpc.BUSY_RETRY_AFTER_MS)
            # At the limit the server still answers whoever watches its health.
            reply = await health.Check(health_pb2.HealthCheckRequest(service=ROUTER), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

            held[0].cancel()  # a call its client gave up gives its place back
            await asyncio.sleep(0.2)
            held[0] = await _started(stub)
            assert (await _refusal(stub)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            servicer.release.set()  # and so do calls that end
            assert [await _rest(call) for call in held] == [["done"], ["done"]]
            servicer.release.clear()
            again = [await _started(stub), await _started(stub)]
            servicer.release.set()
            assert [await _rest(call) for call in again] == [["done"], ["done"]]
    finally:
        await service.stop()


def test_a_server_at_its_limit_refuses_with_a_hint_and_stays_healthy():
    asyncio.run(_limit_case())
