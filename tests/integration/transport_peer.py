"""Producer and consumer processes for the transport leak test: real gRPC, real shared memory or remote pulls,
no model."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys

import grpc
import psutil
import torch
from google.protobuf import struct_pb2

from mmserve import rpc, transport
from mmserve.transport import remote
from mmserve.config import ServiceConfig
from mmserve.v1 import tensor_pb2

SERVICE = "mmserve.test.Producer"
DEVICE = "cpu"  # where produced tensors live: cuda for the CUDA IPC test


def pattern(nbytes: int, seed: int) -> torch.Tensor:
    """Bytes a consumer can check cheaply: all (seed mod 251), except the first four: 0, 1, 2, 3."""
    tensor = torch.full((nbytes,), seed % 251, dtype=torch.uint8)
    tensor[:4] = torch.arange(4)
    return tensor


async def _produce(request: tensor_pb2.TensorRef, context) -> tensor_pb2.TensorRef:
    nbytes, seed = request.shape
    return await asyncio.to_thread(transport.to_ref, pattern(nbytes, seed).to(DEVICE))


def _stats(store: transport.TensorStore, idle: bool = True) -> struct_pb2.Struct:
    stats = struct_pb2.Struct()
    stats.update({"idle": idle, "live_leases": store.num_live_leases(), "expired": store.num_expired,
                  "segments": len(transport.shm.list_segments(store.prefix))})
    return stats


async def run_producer(lease_s: float, policy: str) -> None:
    """Serves Produce (a tensor of the asked size) and WaitIdle (blocks until no lease is live)."""
    service = rpc.Service(ServiceConfig(transport=policy, inline_limit_bytes=1, lease_s=lease_s), [SERVICE])

    async def wait_idle(request: struct_pb2.Struct, context) -> struct_pb2.Struct:
        idle = await asyncio.to_thread(service.store.wait_idle, request["timeout_s"])
        return _stats(service.store, idle)

    service.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Produce": grpc.unary_unary_rpc_method_handler(
            _produce, tensor_pb2.TensorRef.FromString, tensor_pb2.TensorRef.SerializeToString),
        "WaitIdle": grpc.unary_unary_rpc_method_handler(
            wait_idle, struct_pb2.Struct.FromString, struct_pb2.Struct.SerializeToString),
    })])
    await rpc.run_until_signalled(service, on_start=lambda port: print(json.dumps({"port": port}), flush=True))


def produce_call(channel: grpc.aio.Channel):
    return channel.unary_unary(f"/{SERVICE}/Produce", request_serializer=tensor_pb2.TensorRef.SerializeToString,
                               response_deserializer=tensor_pb2.TensorRef.FromString)


async def run_consumer(address: str, num_handoffs: int, cancel_fraction: float, hold: int, location: str,
                       stall: bool = False) -> None:
    """Runs handoffs (some cancelled mid-flight), checking every tensor; or holds refs unmapped until killed; or
    (stall) starts pulling a large remote tensor, reads one chunk and stops reading until killed."""
    rng = random.Random(0)
    async with grpc.aio.insecure_channel(address) as channel:
        produce = produce_call(channel)
        if stall:
            ref = await produce(tensor_pb2.TensorRef(shape=[256 * 1024 * 1024, 0]))
            pull = channel.unary_stream(f"/{remote.SERVICE}/Pull", tensor_pb2.PullRequest.SerializeToString,
                                        remote.decode_chunk)(tensor_pb2.PullRequest(
                                            handle_id=ref.remote.handle_id))
            await pull.read()
            print(json.dumps({"pulling": ref.remote.handle_id}), flush=True)
            await asyncio.Event().wait()  # flow control stops the producer; until SIGKILL
        if hold:
            refs = [await produce(tensor_pb2.TensorRef(shape=[256 * 1024, i])) for i in range(hold)]
            print(json.dumps({"holding": [r.shared_memory.name or r.remote.handle_id for r in refs]}), flush=True)
            await asyncio.Event().wait()  # until SIGKILL
        rss = {}
        counts = {"mapped": 0, "cancelled": 0}
        slots = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            nbytes, seed = rng.randrange(64 * 1024, 1024 * 1024), i
            async with slots:
                call = produce(tensor_pb2.TensorRef(shape=[nbytes, seed]))
                if rng.random() < cancel_fraction:
                    await asyncio.sleep(rng.choice([0, 0, 0.001]))
                    call.cancel()
                    counts["cancelled"] += 1
                    return
                ref = await call
            assert ref.WhichOneof("location") == location, ref.WhichOneof("location")
            if rng.random() < cancel_fraction:  # a consumer that gives up while the bytes arrive
                pull = asyncio.ensure_future(transport.resolve(ref))
                await asyncio.sleep(rng.choice([0, 0.0005]))
                pull.cancel()
                try:
                    tensor = await pull  # it may have finished first
                except asyncio.CancelledError:
                    counts["cancelled"] += 1
                    return
            else:
                tensor = await transport.resolve(ref)
            assert tensor.shape == (nbytes,) and tensor[:5].tolist() == [0, 1, 2, 3, seed % 251]
            assert int(tensor[-1]) == seed % 251
            counts["mapped"] += 1

        for start in range(0, num_handoffs, 100):
            await asyncio.gather(*(one(i) for i in range(start, min(start + 100, num_handoffs))),
                                 return_exceptions=False)
            gc.collect()
            rss["warm" if start == 100 else "end"] = psutil.Process().memory_info().rss
        print(json.dumps({**counts, "rss_warm": rss.get("warm", 0), "rss_end": rss["end"]}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["producer", "consumer"])
    parser.add_argument("--address", default="")
    parser.add_argument("--lease-s", type=float, default=0.5)
    parser.add_argument("--num-handoffs", type=int, default=1000)
    parser.add_argument("--cancel-fraction", type=float, default=0.1)
    parser.add_argument("--hold", type=int, default=0)
    parser.add_argument("--transport", choices=["shm", "remote", "auto"], default="shm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stall", action="store_true")
    args = parser.parse_args(argv)
    if args.role == "producer":
        global DEVICE
        DEVICE = args.device
        asyncio.run(run_producer(args.lease_s, args.transport))
    else:
        location = "shared_memory" if args.transport == "shm" else "remote"
        asyncio.run(run_consumer(args.address, args.num_handoffs, args.cancel_fraction, args.hold, location,
                                 args.stall))


if __name__ == "__main__":
    sys.exit(main())
