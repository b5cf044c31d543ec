"""Encoder benchmark: dynamic batching vs the transformers vision tower one request at a time, and a
64-frame video encoded whole vs split over 2 encoder replicas.

    python benchmarks/encoder.py [--family qwen2_5_vl|qwen3_vl|internvl] [--preset tiny|PRESET|both]
                                 [--video-frames 64] [--concurrency 1,4,16]

Both sides run the same tower, weights and inputs: the family's vision tower (family.load_vision_tower), its
image preprocessing (family.preprocess_image) and its encode (family.encode). Batching is the service's own
Batcher; the split video runs two real encoder processes (one thread each) against one process with both threads,
its frames at the size the family resizes them to. "both" runs the family's tiny preset and its real-widths one.
Last line: batched_speedup_16=X (the largest preset run).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import pathlib
import subprocess
import sys
import tempfile
import time

import PIL.Image
import torch

from mmserve import rpc, transport
from stack.ports import free_port
from mmserve.models import loading
from mmserve.models.family import family_of
from mmserve.models.tiny import build_family_model
from mmserve.v1 import decoder_pb2, encoder_pb2, encoder_pb2_grpc
from services.encoder.batcher import Batcher

# Each family's presets, tiny first and real widths last; inputs sized so the real-widths towers (Qwen2.5-VL-3B's
# 32 blocks of width 1280) finish on a 2-core CPU. A family resizes frames to its own multiple (Qwen3-VL: 32 pixels,
# InternVL: one 448-pixel tile).
PRESETS = {"qwen2_5_vl": ["tiny", "qwen2.5-vl-3b-width"], "qwen3_vl": ["tiny", "qwen3-vl-2b-width"],
           "internvl": ["tiny", "tiny-qwen3", "internvl3-1b-width"]}
SIZES = {"tiny": {"image": 448, "frame": 224}, "tiny-qwen3": {"image": 448, "frame": 224}}
REAL_WIDTHS = {"image": 224, "frame": 112}


def frames(n: int, height: int, seed: int, width: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, height, width or height, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def pixels(family, clip: torch.Tensor):
    """The family's pixel values and item of one image (a uint8 [1,H,W,3] frame)."""
    return family.preprocess_image(PIL.Image.fromarray(clip[0].numpy()))


@torch.inference_mode()
def one_at_a_time(tower, family, inputs) -> float:
    start = time.perf_counter()
    for pv, item in inputs:
        family.encode(tower, pv, [item])
    return time.perf_counter() - start


async def batched(tower, family, inputs, concurrency: int) -> float:
    batcher = Batcher(tower, family.encode, max_batch_patches=1 << 20, max_queue=1024)
    batcher.start()
    try:
        start = time.perf_counter()
        for i in range(0, len(inputs), concurrency):
            await asyncio.gather(*(batcher.encode(pv, item) for pv, item in inputs[i:i + concurrency]))
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


def video_split(model: str, clip: torch.Tensor) -> tuple[float, float]:
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


def run_preset(family_name: str, preset: str, workdir: pathlib.Path, num_frames: int,
               concurrencies: tuple[int, ...] = (1, 4, 16)) -> float:
    model = str(build_family_model(family_name, workdir / preset, preset=preset))
    family = family_of(model)
    # The encoder service's default dtype ("auto"), so its figures and the tower's own are in one precision.
    cpu = torch.device("cpu")
    tower = family.load_vision_tower(model, loading.resolve_dtype("auto", model, cpu), cpu)
    side = SIZES.get(preset, REAL_WIDTHS)
    title = preset if family_name == "qwen2_5_vl" else f"{family_name} {preset}"
    print(f"\n== {title}: {side['image']}x{side['image']} images ==")
    print(f"{'concurrent':>10} {'one-at-a-time img/s':>20} {'batched img/s':>14} {'batched tok/s':>14} {'speedup':>8}")
    speedup = {}
    for concurrency in concurrencies:
        n = max(16, concurrency * 2)
        inputs = [pixels(family, frames(1, side["image"], seed=i)) for i in range(n)]
        tokens = sum(family.num_tokens(item) for _, item in inputs)
        one_at_a_time(tower, family, inputs[:2])  # warm-up
        sequential = one_at_a_time(tower, family, inputs)
        together = asyncio.run(batched(tower, family, inputs, concurrency))
        speedup[concurrency] = sequential / together
        print(f"{concurrency:>10} {n / sequential:>20.2f} {n / together:>14.2f} {tokens / together:>14.0f} "
              f"{speedup[concurrency]:>8.2f}")
    # The frame side rounded to the family's alignment, not raised to its minimum pixels: the video's size is the run's.
    params = dataclasses.replace(family.default_params("video"), min_pixels=0)
    plan = family.plan_decode("video", params, side["frame"], side["frame"], num_frames, 2.0)
    whole, split = video_split(model, frames(num_frames, plan.height, seed=3, width=plan.width))
    print(f"{num_frames}-frame {plan.width}x{plan.height} video: whole on 1 encoder (2 threads) {whole * 1e3:.0f} ms, "
          f"split over 2 encoders (1 thread each) {split * 1e3:.0f} ms")
    return speedup[concurrencies[-1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_5_vl", choices=sorted(PRESETS))
    parser.add_argument("--preset", default="both",
                        choices=sorted({p for ps in PRESETS.values() for p in ps} | {"both"}))
    parser.add_argument("--video-frames", type=int, default=64, help="frames of the split video (even)")
    parser.add_argument("--concurrency", default="1,4,16", help="concurrent images of each row (the last line's "
                                                                "speed-up is the last row's)")
    args = parser.parse_args()
    if args.preset not in PRESETS[args.family] + ["both"]:
        parser.error(f"--preset {args.preset} is not one of {args.family}'s: {', '.join(PRESETS[args.family])}")
    presets = [PRESETS[args.family][0], PRESETS[args.family][-1]] if args.preset == "both" else [args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        concurrencies = tuple(int(c) for c in args.concurrency.split(","))
        results = [run_preset(args.family, p, pathlib.Path(tmp), args.video_frames, concurrencies) for p in presets]
    print(f"batched_speedup_{concurrencies[-1]}={results[-1]:.2f}")


if __name__ == "__main__":
    main()
