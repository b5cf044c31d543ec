"""Tensor handoff between two real processes: shared memory and remote pull vs inline gRPC bytes, 1 MB to 256 MB;
cache latency.

Run: python benchmarks/transport.py [--sizes-mb 1,4,16,64,256]. The producer is this script in a second process.
Each handoff is timed from the consumer's request until it holds the tensor with every page touched:
  inline      the tensor's bytes inside the gRPC reply (the baseline)
  shm-copy    the producer copies its tensor into a fresh shared-memory segment; the consumer maps it
  shm         the producer computed its tensor straight into shared memory (TensorStore.empty); nothing is copied
  remote      the producer holds its tensor under a lease; the consumer pulls it from the producer's TensorStore
              service in 1 MiB chunks into one preallocated tensor (the transport between hosts)
Last line: shm_speedup_vs_inline_64MB=X (median inline latency / median shm latency at 64 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import mmserve  # noqa: F401  (first: turns gRPC's fork handlers off before grpc loads; see its __init__)
import grpc  # noqa: E402
import torch  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402

from mmserve import rpc, transport  # noqa: E402
from mmserve.config import ServiceConfig  # noqa: E402
from mmserve.v1 import tensor_pb2  # noqa: E402

SERVICE = "mmserve.bench.Producer"
MB = 1024 * 1024
CAP = 1024 * MB  # inline 256 MB needs more than the default 256 MB message cap
MODES = ("inline", "shm-copy", "shm", "remote")


async def serve() -> None:
    """The producer: keeps one source tensor per size, plus the next in-place shm tensor when asked to prepare."""
    config = ServiceConfig(transport="shm", inline_limit_bytes=0, lease_s=60.0, max_message_bytes=CAP,
                           log_level="WARNING")
    service = rpc.Service(config, [SERVICE])
    sources: dict[int, torch.Tensor] = {}
    prepared: dict[int, torch.Tensor] = {}

    def source(nbytes: int) -> torch.Tensor:
        if nbytes not in sources:
            sources.clear()
            sources[nbytes] = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        return sources[nbytes]

    async def prepare(request: struct_pb2.Struct, context) -> struct_pb2.Struct:
        nbytes = int(request["nbytes"])
        out = service.store.empty((nbytes,), torch.uint8)
        out.copy_(source(nbytes))  # the producer's "computation" writes its output in place
        prepared[nbytes] = out
        return struct_pb2.Struct()

    async def fetch(request: struct_pb2.Struct, context) -> tensor_pb2.TensorRef:
        nbytes, mode = int(request["nbytes"]), request["mode"]
        if mode == "inline":
            return transport.to_inline(source(nbytes))
        if mode == "shm-copy":
            return service.store.to_ref(source(nbytes))
        if mode == "remote":
            return tensor_pb2.TensorRef(dtype="uint8", shape=[nbytes], remote=tensor_pb2.RemoteRef(
                address=service.store.address, handle_id=service.store.hold(source(nbytes)), nbytes=nbytes))
        return service.store.to_ref(prepared.pop(nbytes))

    service.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Prepare": grpc.unary_unary_rpc_method_handler(prepare, struct_pb2.Struct.FromString,
                                                       struct_pb2.Struct.SerializeToString),
        "Fetch": grpc.unary_unary_rpc_method_handler(fetch, struct_pb2.Struct.FromString,
                                                     tensor_pb2.TensorRef.SerializeToString),
    })])
    await rpc.run_until_signalled(service, on_start=lambda port: print(port, flush=True))


def struct(**fields) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(fields)
    return s


async def handoffs(address: str, sizes_mb: list[int], budget_s: float) -> dict[tuple[int, str], list[float]]:
    """Median-ready latencies (seconds) per (size, mode); repetitions shrink with size to fit the budget."""
    channel = grpc.aio.insecure_channel(address, options=rpc.message_options(CAP))
    prepare = channel.unary_unary(f"/{SERVICE}/Prepare", struct_pb2.Struct.SerializeToString,
                                  struct_pb2.Struct.FromString)
    fetch = channel.unary_unary(f"/{SERVICE}/Fetch", struct_pb2.Struct.SerializeToString,
                                tensor_pb2.TensorRef.FromString)
    results = {}
    for size in sizes_mb:
        reps = max(3, min(30, int(budget_s / len(sizes_mb) / 3 / (0.02 * size))))
        for mode in MODES:
            times = []
            for _ in range(reps + 1):  # the first is a warm-up
                if mode == "shm":
                    await prepare(struct(nbytes=size * MB), timeout=120)
                start = time.perf_counter()
                ref = await fetch(struct(nbytes=size * MB, mode=mode), timeout=120)
                tensor = await transport.resolve(ref) if mode == "remote" else transport.from_ref(ref)
                tensor[::4096].sum()  # touch every page
                times.append(time.perf_counter() - start)
                del tensor
            results[size, mode] = times[1:]
    await channel.close()
    return results


async def cache_latency(sizes_mb: list[int]) -> dict[int, tuple[float, float]] | None:
    """Median put and get latency of the embedding cache against a private redis-server (local LRU off)."""
    import redis.exceptions

    from mmserve.cache import CachedEmbedding, EmbeddingCache
    from stack.launcher import redis_server_argv
    from stack.ports import free_port

    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    server = subprocess.Popen(redis_server_argv(binary, "127.0.0.1", port, maxmemory="1gb",
                                                workdir=tempfile.gettempdir()), stdout=subprocess.DEVNULL)
    cache = EmbeddingCache(f"redis://127.0.0.1:{port}/0", timeout_s=5.0)
    out = {}
    try:
        for _ in range(100):  # redis-server takes a moment to listen
            try:
                await cache.client.ping()
                break
            except (OSError, redis.exceptions.ConnectionError):
                await asyncio.sleep(0.05)
        for size in sizes_mb:
            entry = CachedEmbedding(transport.to_inline(torch.randn(size * MB // 4)), (1, 1, 1), 0.0)
            puts, gets = [], []
            for i in range(6):
                start = time.perf_counter()
                assert await cache.put(f"bench:{size}:{i}", entry)
                puts.append(time.perf_counter() - start)
                start = time.perf_counter()
                assert await cache.get(f"bench:{size}:{i}") is not None
                gets.append(time.perf_counter() - start)
            out[size] = (statistics.median(puts[1:]), statistics.median(gets[1:]))
    finally:
        await cache.close()
        server.terminate()
        server.wait()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sizes-mb", default="1,4,16,64,256")
    parser.add_argument("--budget-s", type=float, default=60.0, help="rough time for the handoff part")
    args = parser.parse_args()
    if args.serve:
        return asyncio.run(serve())
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    producer = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        address = f"127.0.0.1:{producer.stdout.readline().strip()}"
        results = asyncio.run(handoffs(address, sizes, args.budget_s))
    finally:
        producer.terminate()
        producer.wait()
    print(f"handoff between two processes, {os.cpu_count()} CPUs; median ms (GB/s), consumer touches every page")
    print(f"{'size':>8} " + " ".join(f"{m:>20}" for m in MODES) + f" {'shm-copy x':>11} {'shm x':>7} {'remote x':>9}")
    for size in sizes:
        med = {m: statistics.median(results[size, m]) for m in MODES}
        cells = " ".join(f"{med[m] * 1e3:>10.2f} ({size / 1024 / med[m]:>6.2f})".rjust(20) for m in MODES)
        print(f"{size:>5} MB {cells} {med['inline'] / med['shm-copy']:>11.1f} {med['inline'] / med['shm']:>7.1f} "
              f"{med['inline'] / med['remote']:>9.1f}")
    cache = asyncio.run(cache_latency([s for s in sizes if s <= 16]))
    if cache:
        print("embedding cache (Redis, pipelined, local LRU off): median ms")
        for size, (put, get) in cache.items():
            print(f"{size:>5} MB put {put * 1e3:8.2f} get {get * 1e3:8.2f}")
    if 64 in sizes:
        inline, copy, shm, pulled = (statistics.median(results[64, m]) for m in MODES)
        print(f"remote_speedup_vs_inline_64MB={inline / pulled:.2f}")
        print(f"shm_copy_speedup_vs_inline_64MB={inline / copy:.1f}")
        print(f"shm_speedup_vs_inline_64MB={inline / shm:.1f}")


if __name__ == "__main__":
    main()
