"""Encoder benchmark: dynamic batching vs the transformers vision tower one request at a time, and a
64-frame video encoded whole vs split over 2 encoder replicas.

    python benchmarks/encoder.py [--preset tiny|qwen2.5-vl-3b-width|both]

Both sides run the same tower, weights and inputs. Batching is the service's own Batcher; the split
video runs two real encoder processes (one thread each) against one process with both threads.
Last line: batched_speedup_16=X (the largest preset run).
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import subprocess
import sys
import tempfile
import time

import torch

from mmserve import rpc, transport
from stack.launcher import free_port
from mmserve.media.preprocess import ImageProcessing, to_pixel_values
from mmserve.models import loading
from mmserve.models.family import MediaItem, family_of
from mmserve.models.tiny import build_tiny_model
from mmserve.v1 import decoder_pb2, encoder_pb2, encoder_pb2_grpc
from services.encoder.batcher import Batcher

# Inputs sized so the 3B-width tower (32 blocks of width 1280) finishes on a 2-core CPU.
SIZES = {"tiny": {"image": 448, "frame": 224}, "qwen2.5-vl-3b-width": {"image": 224, "frame": 112}}


def frames(n: int, side: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def pixels(p: ImageProcessing, clip: torch.Tensor):
    return to_pixel_values(clip, patch_size=p.patch_size, temporal_patch_size=p.temporal_patch_size,
                           merge_size=p.merge_size, image_mean=p.image_mean, image_std=p.image_std)


@torch.inference_mode()
def one_at_a_time(tower, inputs) -> float:
    start = time.perf_counter()
    for pv, grid in inputs:
        tower(pv, grid_thw=torch.tensor([grid])).pooler_output
    return time.perf_counter() - start


async def batched(tower, family, inputs, concurrency: int) -> float:
    batcher = Batcher(tower, family.encode, max_batch_patches=1 << 20, max_queue=1024)
    batcher.start()
    try:
        start = time.perf_counter()
        for i in range(0, len(inputs), concurrency):
            await asyncio.gather(*(batcher.encode(pv, MediaItem("image", grid))
                                   for pv, grid in inputs[i:i + concurrency]))
        return time.perf_counter() - start
    finally:
        await batcher.stop()


def start_encoders(model: str, count: int, threads: int) -> tuple[list[subprocess.Popen], list[str]]:
    ports = [free_port() for _ in range(count)]
    procs = [subprocess.Popen([sys.executable, "-m", "services.encoder", "--model", model, "--port", str(port),
                               "--num-threads", str(threads), "--transport", "inline", "--log-level", "WARNING"])
             for port in ports]
    addrs = [f"127.0.0.1:{port}" for port in ports]

    async def all_healthy() -> None:
        await asyncio.gather(*(rpc.wait_healthy(a, 120) for a in addrs))

    try:
        asyncio.run(all_healthy())
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return procs, addrs


async def encode_split(addrs: list[str], clip: torch.Tensor, num_chunks: int) -> float:
    """Encodes clip in num_chunks temporal chunks spread round-robin over addrs; wall time in seconds."""
    channels = [rpc.insecure_channel(a, 1 << 30) for a in addrs]
    stubs = [encoder_pb2_grpc.EncoderStub(c) for c in channels]
    size = clip.shape[0] // num_chunks
    requests = [encoder_pb2.EncodeRequest(kind=decoder_pb2.MEDIA_KIND_VIDEO,
                                          frames=transport.to_inline(clip[i * size:(i + 1) * size]))
                for i in range(num_chunks)]
    try:
        await stubs[0].Encode(requests[0])  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(stubs[i % len(stubs)].Encode(r) for i, r in enumerate(requests)))
        return time.perf_counter() - start
    finally:
        for c in channels:
            await c.close()


def video_split(model: str, side: int) -> tuple[float, float]:
    clip = frames(64, side, seed=3)
    results = []
    for count, threads, chunks in ((1, 2, 1), (2, 1, 2)):
        procs, addrs = start_encoders(model, count, threads)
        try:
            results.append(asyncio.run(encode_split(addrs, clip, chunks)))
        finally:
            for p in procs:
                p.terminate()
                p.wait()
    return results[0], results[1]


def run_preset(preset: str, workdir: pathlib.Path) -> float:
    model = str(build_tiny_model(workdir / preset, preset=preset))
    # The encoder service's default dtype ("auto"), so its figures and the tower's own are in one precision.
    tower = loading.load_vision_tower(model, loading.resolve_dtype("auto", model, torch.device("cpu")))
    p = ImageProcessing.from_pretrained(model)
    side = SIZES[preset]
    print(f"\n== {preset}: {side['image']}x{side['image']} images ==")
    print(f"{'concurrent':>10} {'one-at-a-time img/s':>20} {'batched img/s':>14} {'batched tok/s':>14} {'speedup':>8}")
    speedup = {}
    for concurrency in (1, 4, 16):
        n = max(16, concurrency * 2)
        inputs = [pixels(p, frames(1, side["image"], seed=i)) for i in range(n)]
        tokens = sum(pv.shape[0] for pv, _ in inputs) // 4
        one_at_a_time(tower, inputs[:2])  # warm-up
        sequential = one_at_a_time(tower, inputs)
        together = asyncio.run(batched(tower, family_of(model), inputs, concurrency))
        speedup[concurrency] = sequential / together
        print(f"{concurrency:>10} {n / sequential:>20.2f} {n / together:>14.2f} {tokens / together:>14.0f} "
              f"{speedup[concurrency]:>8.2f}")
    whole, split = video_split(model, side["frame"])
    print(f"64-frame {side['frame']}x{side['frame']} video: whole on 1 encoder (2 threads) {whole * 1e3:.0f} ms, "
          f"split over 2 encoders (1 thread each) {split * 1e3:.0f} ms")
    return speedup[16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="both", choices=["tiny", "qwen2.5-vl-3b-width", "both"])
    args = parser.parse_args()
    presets = ["tiny", "qwen2.5-vl-3b-width"] if args.preset == "both" else [args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_preset(p, pathlib.Path(tmp)) for p in presets]
    print(f"batched_speedup_16={results[-1]:.2f}")


if __name__ == "__main__":
    main()
