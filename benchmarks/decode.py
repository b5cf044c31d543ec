"""Video decode benchmark: mmserve's chunked decoder vs the ways users decode, for the same sampled frames.

Every method returns the frames Qwen2.5-VL needs (2 fps, linspace indices, the model's resize):
  mmserve      the decoder service's engine (plan GOPs, chunks over worker processes), via LocalDecoder
  pyav         sequential PyAV as users write it: decode every frame, keep the sampled ones, resize
  pyav-frame-threads  the same with FFmpeg frame threading on all cores (a stronger lone-request peer)
  decord       decord VideoReader.get_batch (when installed; it pulls no torch)
On a machine with NVDEC (a GPU and PyNvVideoCodec) mmserve decodes on the GPUs, and a GPU section follows:
lone-request latency of the headline clip with 1..N GPUs and throughput per GPU with 8 concurrent requests.
torchcodec is not run: its wheel pulls no torch, but it needs CUDA's libnvrtc and system FFmpeg libraries,
which this CPU-only machine lacks.

Lone-request latency p50/p90 per clip, then throughput with 8 concurrent requests (peers run one request per
worker process, one worker per core). Clips are synthetic high-entropy video (a panning noise texture with
moving shapes), generated once into --cache. The last line is speedup_vs_pyav on the lone 60 s 720p clip.

    python benchmarks/decode.py [--runs 3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import sys
import time
from pathlib import Path

import av
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmserve.media import nvdec  # noqa: E402
from mmserve.media import preprocess as pp  # noqa: E402
from services.decoder.config import DecoderConfig  # noqa: E402
from services.decoder.oneshot import LocalDecoder  # noqa: E402

FPS = 2.0
CONCURRENCY = 8
# (seconds, width, height, gop, codec); the first is the headline clip. 1080p and HEVC clips are 20 s (not
# 30-120 s) to keep the whole run near 5 minutes on 2 cores.
CLIPS = [
    (60, 1280, 720, 30, "libx264"),
    (30, 1280, 720, 250, "libx264"),
    (20, 1920, 1080, 30, "libx264"),
    (20, 1280, 720, 30, "libx265"),
]
# GOP 250 leaves mmserve no GOPs to skip: the fairest clip for throughput.
THROUGHPUT_CLIP = 1
THROUGHPUT_METHODS = ("mmserve", "pyav", "decord")


def clip_name(spec: tuple) -> str:
    seconds, _, height, gop, codec = spec
    return f"{height}p-{seconds}s-{'hevc' if codec == 'libx265' else 'h264'}-gop{gop}"


def make_clip(path: Path, seconds: float, width: int, height: int, gop: int, codec: str, fps: int = 30) -> None:
    """A panning high-entropy texture with per-frame noise and a moving block (about 10-20 Mb/s at 720p)."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(coarse, 8, 0), 8, 1)[: 2 * height, : 2 * width].astype(np.int16)
    texture = np.clip(texture + rng.integers(-40, 41, texture.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    noise = [rng.integers(-6, 7, (height, width, 3), dtype=np.int16) for _ in range(3)]
    options = ({"preset": "veryfast"} if codec == "libx264" else
               {"preset": "ultrafast", "x265-params": "log-level=none"})
    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.options = {**options, "sc_threshold": "0"} if codec == "libx264" else options
        for i in range(int(seconds * fps)):
            t = i / fps
            x = int(width / 2 * (1 + np.sin(0.7 * t)))
            y = int(height / 2 * (1 + np.sin(0.4 * t + 1)))
            img = texture[y:y + height, x:x + width].astype(np.int16) + noise[i % 3]
            bx = int((width - 200) * ((0.1 * t) % 1.0))
            img[height // 3: height // 3 + 160, bx:bx + 200] = (230, 30, 30)
            frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    tmp.rename(path)


def _target(total: int, video_fps: float, height: int, width: int) -> tuple[list[int], int, int]:
    indices, _ = pp.sample_frame_indices(total, video_fps, fps=FPS)
    budget = pp.video_max_pixels(len(indices))
    out_h, out_w = pp.smart_resize(height, width, pp.IMAGE_FACTOR, pp.VIDEO_MIN_PIXELS, budget)
    return indices, out_h, out_w


def pyav_sequential(path: str, frame_threads: bool = False) -> torch.Tensor:
    """What users write: decode every frame in order, keep the sampled ones, resize them for the model."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        if frame_threads:
            stream.thread_type = "AUTO"
        indices, out_h, out_w = _target(stream.frames, float(stream.average_rate), stream.height, stream.width)
        wanted, kept = set(indices), []
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                kept.append(frame.to_ndarray(format="rgb24"))
            if i >= indices[-1]:
                break
    return pp.resize_frames(torch.from_numpy(np.stack(kept)), out_h, out_w)


def decord_batch(path: str, num_threads: int = 0) -> torch.Tensor:
    """decord's batch access by index, then the same resize."""
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
    height, width = reader[0].shape[:2]
    indices, out_h, out_w = _target(len(reader), reader.get_avg_fps(), height, width)
    return pp.resize_frames(torch.from_numpy(reader.get_batch(indices).asnumpy()), out_h, out_w)


def _pool_init() -> None:
    torch.set_num_threads(1)  # one request per worker process, one worker per core


def _pool_run(method: str, path: str) -> tuple:
    frames = PEERS[method](path) if method != "decord" else decord_batch(path, num_threads=1)
    return tuple(frames.shape)


PEERS = {"pyav": pyav_sequential, "pyav-frame-threads": lambda p: pyav_sequential(p, True), "decord": decord_batch}


def _stats(times: list[float]) -> tuple[float, float]:
    return float(np.percentile(times, 50)), float(np.percentile(times, 90))


async def lone_latency(decoder: LocalDecoder, methods: list[str], path: str, runs: int, peer_runs: int) -> dict:
    """p50/p90 seconds per method for one request at a time; checks each peer returns mmserve's frames."""
    results, reference = {}, None
    for method in methods:
        times = []
        for _ in range(runs if method in ("mmserve", "pyav") else peer_runs):
            start = time.perf_counter()
            if method == "mmserve":
                frames = (await decoder.decode(path)).frames
            else:
                frames = PEERS[method](path)
            times.append(time.perf_counter() - start)
        reference = frames if reference is None else reference
        exact = frames.shape == reference.shape and torch.equal(frames, reference)
        results[method] = (*_stats(times), exact, len(times))
    return results


async def throughput(decoder: LocalDecoder, methods: list[str], path: str, num_workers: int) -> dict:
    """Requests per second with CONCURRENCY requests in flight."""
    results = {}
    for method in methods:
        if method == "mmserve":
            start = time.perf_counter()
            await asyncio.gather(*(decoder.decode(path) for _ in range(CONCURRENCY)))
            results[method] = CONCURRENCY / (time.perf_counter() - start)
            continue
        ctx = __import__("multiprocessing").get_context("forkserver")
        with concurrent.futures.ProcessPoolExecutor(num_workers, ctx, initializer=_pool_init) as pool:
            list(pool.map(_pool_run, ["pyav"] * num_workers, [path] * num_workers))  # warm the workers
            start = time.perf_counter()
            list(pool.map(_pool_run, [method] * CONCURRENCY, [path] * CONCURRENCY))
            results[method] = CONCURRENCY / (time.perf_counter() - start)
    return results


def _has_decord() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="lone-request runs per clip for mmserve and pyav")
    parser.add_argument("--peer-runs", type=int, default=1, help="lone-request runs per clip for the other peers")
    parser.add_argument("--quick", action="store_true", help="10 s clips (a smoke test, not the numbers)")
    parser.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "mmserve-bench-clips"))
    parser.add_argument("--workers", type=int, default=0, help="mmserve workers and peer pool size (0: cores)")
    args = parser.parse_args()
    clips = [(min(spec[0], 10), *spec[1:]) if args.quick else spec for spec in CLIPS]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    paths = {}
    for spec in clips:
        path = paths[clip_name(spec)] = cache / f"{clip_name(spec)}.mp4"
        if not path.exists():
            start = time.perf_counter()
            make_clip(path, *spec)
            print(f"generated {path.name}: {path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s",
                  flush=True)
    config = DecoderConfig(num_workers=args.workers, log_level="WARNING")
    num_workers = config.effective_workers
    methods = ["mmserve", "pyav", "pyav-frame-threads"] + (["decord"] if _has_decord() else [])
    print(f"{os.cpu_count()} CPU cores, {num_workers} mmserve workers; torchcodec: not installable here "
          f"(needs CUDA libnvrtc + system FFmpeg){'' if _has_decord() else '; decord: not installed'}")
    async with LocalDecoder(config) as decoder:
        await decoder.decode(next(iter(paths.values())))  # warm-up
        print("\nlone request, latency in seconds (exact: the same frames as mmserve)")
        print(f"{'clip':22} {'MB':>5} {'method':19} {'runs':>4} {'p50':>6} {'p90':>6} {'vs pyav':>8} exact")
        headline = None
        for name, path in paths.items():
            size = path.stat().st_size / 1e6
            rows = await lone_latency(decoder, methods, str(path), args.runs, args.peer_runs)
            for method, (p50, p90, exact, runs) in rows.items():
                print(f"{name:22} {size:5.1f} {method:19} {runs:4} {p50:6.2f} {p90:6.2f} "
                      f"{rows['pyav'][0] / p50:7.2f}x {'yes' if exact else 'NO'}", flush=True)
            headline = headline or rows["pyav"][0] / rows["mmserve"][0]
        tp_name = clip_name(clips[THROUGHPUT_CLIP])
        print(f"\nthroughput, {CONCURRENCY} concurrent requests of {tp_name} "
              f"(peers: one request per worker process, {num_workers} workers)")
        rates = await throughput(decoder, [m for m in methods if m in THROUGHPUT_METHODS], str(paths[tp_name]),
                                 num_workers)
        best_peer = max(v for k, v in rates.items() if k != "mmserve")
        for method, rate in rates.items():
            print(f"{method:19} {rate:6.3f} req/s  {rate * clips[THROUGHPUT_CLIP][0]:6.1f} video-s/s", flush=True)
        print(f"mmserve vs best peer: {rates['mmserve'] / best_peer:.2f}x")
    if nvdec.is_available():
        await gpu_rows(str(paths[clip_name(clips[0])]), args.runs)
    print(f"speedup_vs_pyav={headline:.2f}")


async def gpu_rows(path: str, runs: int) -> None:
    """NVDEC: lone-request latency of one clip with 1..N GPUs, and throughput per GPU under 8 concurrent requests."""
    print(f"\nNVDEC on {nvdec.num_gpus()} GPU(s), {Path(path).name}")
    print(f"{'GPUs':>4} {'p50 s':>6} {'p90 s':>6} {'req/s':>6} {'req/s/GPU':>9}")
    for num_gpus in range(1, nvdec.num_gpus() + 1):
        async with LocalDecoder(DecoderConfig(device="cuda", nvdec_gpus=num_gpus, log_level="WARNING")) as decoder:
            await decoder.decode(path)  # warm-up: CUDA context and decoder creation
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                await decoder.decode(path)
                times.append(time.perf_counter() - start)
            start = time.perf_counter()
            await asyncio.gather(*(decoder.decode(path) for _ in range(CONCURRENCY)))
            rate = CONCURRENCY / (time.perf_counter() - start)
        p50, p90 = _stats(times)
        print(f"{num_gpus:4} {p50:6.2f} {p90:6.2f} {rate:6.2f} {rate / num_gpus:9.2f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
