"""Long video, first token early (issue 23): streamed prefill against store-and-forward and transformers.

    python benchmarks/long_video.py [--model DIR] [--seconds 10,20] [--width 320 --height 180] [--chunk-frames 16]
                                    [--modes streamed,store_and_forward] [--source uri|data] [--skip-hf]
    python benchmarks/long_video.py --seconds 60,300 --width 1280 --height 720 --fps 10 --crf 40 \
        --sample-fps 0.5 --max-pixels 100352 --chunk-frames 4
        # the issue's 60 s and 5-minute 720p clips: 10 fps and crf 40 keep the 5-minute clip's bytes and the time
        # to make it within a 2-core machine; 0.5 fps at the model's smallest frames keep its vision tokens
        # (9,600) within the router's default cap of 16,384 and the tiny model's 32,768 positions
    python benchmarks/long_video.py --seconds 60,300,600 ... --router-args "--max-vision-tokens 24576"
        # and a 10-minute clip (19,200 vision tokens: the router's cap raised for it)

One run on this machine, side by side: for each mode a fresh stack (decoder, encoder, llm, router as processes, a
private Redis) serves each clip alone, uncached, after a warm-up on a short clip. Per clip: the client's TTFT, the
CPU seconds all the stack's processes spent on it (and each stage's) and the machine's bound (those seconds over the
cores), and the peak RSS (VmHWM) of the router, decoder (with its workers), encoder and llm after it (clips run
shortest first, so the growth from the first clip to the last is what the longer clip added). The clips go as
file:// URIs under the stack's media root (--source data: their bytes inline, which the router's gRPC message then
holds). Streamed mode also serves the first clip again with half its chunks evicted (partly cached). transformers'
generate runs in this process on the same inputs.
Streamed prefill needs the llm's GenerateStreamed and the decoder's fixed windows; against an llm without them the
router falls back to store-and-forward (it logs so), and the two modes measure the same thing.
Last line: ttft_ratio_vs_store_and_forward_60s=X ttft_vs_cpu_bound_60s=Z peak_rss_growth_5min_vs_60s=Y, for the
first clip ("60s") and the 300 s one ("5min"; the last of --seconds where none is 300 s); the line before it gives
every clip's growth over the first.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import pathlib
import shlex
import sys
import tempfile
import time

import mmserve  # noqa: F401  (first: turns gRPC's fork handlers off before grpc loads; see its __init__)
import redis

from mmserve import rpc
from mmserve.media.samples import make_video
from mmserve.models.tiny import build_tiny_model
from mmserve.v1 import api_pb2, api_pb2_grpc

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from workload import start_redis, start_stack  # noqa: E402

LOOSE_SLO_MS = 1_000_000_000  # lone requests measuring speed: never refused by admission
STAGES = ("router", "decoder", "encoder", "llm")


SAMPLING: dict[str, float] = {}  # --sample-fps and --max-pixels, when given: the request's Media fields


def request(clip: bytes | pathlib.Path, num_tokens: int, lead: str = "") -> api_pb2.GenerateRequest:
    """The clip (its bytes, or its file as a file:// URI), then the question; lead: text before the clip (another
    prompt prefix: the llm's KV prefix cache cannot answer it, the embedding cache still can)."""
    media = (api_pb2.Media(uri=clip.as_uri(), **SAMPLING) if isinstance(clip, pathlib.Path)
             else api_pb2.Media(data=clip, **SAMPLING))
    parts = [api_pb2.Part(video=media), api_pb2.Part(text="Describe the video.")]
    return api_pb2.GenerateRequest(
        messages=[api_pb2.Message(role="user", parts=[api_pb2.Part(text=lead)] * bool(lead) + parts)],
        sampling=api_pb2.SamplingParams(max_tokens=num_tokens, min_tokens=num_tokens, temperature=0.0),
        slo=api_pb2.Slo(ttft_ms=LOOSE_SLO_MS, tpot_ms=LOOSE_SLO_MS))


async def ttft_ms(address: str, req: api_pb2.GenerateRequest) -> tuple[float, api_pb2.Timings]:
    """The client's time to first token of one request run to its end, and the stage timings of its final."""
    async with rpc.channel(address, 1 << 30) as channel:
        start, first, timings = time.perf_counter(), None, api_pb2.Timings()
        async for reply in api_pb2_grpc.RouterStub(channel).Generate(req, timeout=3600):
            if first is None and reply.WhichOneof("event") == "delta":
                first = time.perf_counter()
            if reply.WhichOneof("event") == "final":
                timings = reply.final.timings
        return ((first or time.perf_counter()) - start) * 1e3, timings


def descendants(pid: int) -> list[int]:
    """pid and every process below it (the decoder's forkserver and workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(pathlib.Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system, with reaped children's) of the processes."""
    total = 0.0
    for pid in pids:
        try:
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def peak_rss_mb(pids: list[int]) -> float:
    """Summed peak resident memory (VmHWM) of the processes, MB."""
    total = 0
    for pid in pids:
        try:
            status = pathlib.Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return total / 1024


def stage_pids(stack) -> dict[str, list[int]]:
    return {c.name.split("-")[0]: descendants(c.process.pid) for c in stack.children
            if c.name.split("-")[0] in STAGES}


def serve_mode(mode: str, model: str, clips: dict[float, bytes | pathlib.Path], media_root: str, args) -> dict:
    """One mode's stack: each clip alone, uncached (and streamed, the first one partly cached)."""
    with tempfile.TemporaryDirectory() as workdir:
        redis_stack, redis_url = start_redis(workdir)
        flags = ("--no-stream-prefill",) if mode == "store_and_forward" else (
            "--stream-prefill", "--video-chunk-frames", str(args.chunk_frames))
        stack, address = start_stack(model, redis_url, flags + tuple(shlex.split(args.router_args)),
                                     media_root=media_root)
        try:
            client = redis.Redis.from_url(redis_url)
            asyncio.run(ttft_ms(address, request(make_video(seconds=2.0, fps=30, width=args.width,
                                                            height=args.height, seed=1), args.max_tokens)))
            out = {}
            for seconds, clip in clips.items():
                before_keys = set(client.keys("mmserve:emb:*"))
                before_cpu = {stage: cpu_s(p) for stage, p in stage_pids(stack).items()}
                ttft, timings = asyncio.run(ttft_ms(address, request(clip, args.max_tokens)))
                pids = stage_pids(stack)
                stage_cpu = {stage: cpu_s(p) - before_cpu.get(stage, 0.0) for stage, p in pids.items()}
                cpu = sum(stage_cpu.values())
                out[seconds] = {"ttft_ms": ttft, "cpu_s": cpu, "bound_ms": cpu / os.cpu_count() * 1e3,
                                "stage_cpu_s": stage_cpu,
                                "stages_ms": (timings.decode_ms, timings.encode_ms, timings.prefill_ms),
                                "rss_mb": {s: peak_rss_mb(p) for s, p in pids.items()}}
                written = sorted(set(client.keys("mmserve:emb:*")) - before_keys)
                if mode == "streamed" and seconds == min(clips) and len(written) > 1:
                    client.delete(*written[::2])  # half the chunks evicted
                    again = request(clip, args.max_tokens, lead="Once more.")
                    out[seconds]["partly_cached_ttft_ms"] = asyncio.run(ttft_ms(address, again))[0]
                    out[seconds]["num_chunks"] = len(written)
            return out
        finally:
            stack.stop()
            redis_stack.stop()


def hf_ttft_ms(model: str, clips: dict[float, bytes], num_tokens: int) -> dict[float, float]:
    """transformers' generate on each clip in this process (its processor and prefill), after a warm-up."""
    from hf_baseline import HfModel
    from latency import via_transformers

    hf = HfModel(model)
    via_transformers(hf, request(make_video(seconds=2.0, fps=30, width=64, height=64, seed=1), num_tokens), 1)
    return {s: via_transformers(hf, request(clip, num_tokens), num_tokens)[0] for s, clip in clips.items()}


def on_paper(stages_ms: tuple[float, float, float], seconds: float, args) -> None:
    """The TTFT the same pipeline would reach with N decoders and M encoders (FlashCodec's setting: GPU decoders
    splitting a clip's chunks), from one clip's measured store-and-forward stage times: each stage's time divided
    over its replicas, the stages overlapped chunk by chunk (policy.pipelined_ms)."""
    from services.router.policy import pipelined_ms

    decode, encode, prefill = stages_ms
    num_chunks = max(1, math.ceil(seconds * (args.sample_fps or 2) / args.chunk_frames))  # the family samples 2 fps
    print(f"\non paper, {seconds:.0f} s clip: decode {decode:.0f} ms, encode {encode:.0f} ms, prefill {prefill:.0f} ms "
          f"measured store-and-forward; {num_chunks} chunks")
    print("| decoders N | encoders M | store-and-forward ms | streamed ms |")
    print("|---|---|---|---|")
    for n, m in ((1, 1), (2, 2), (4, 4), (8, 8), (8, 2)):
        stages = (decode / n, encode / m, prefill)
        print(f"| {n} | {m} | {sum(stages):.0f} | {pipelined_ms(stages, num_chunks):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="checkpoint directory (default: a tiny random Qwen2.5-VL)")
    parser.add_argument("--seconds", default="10,20", help="clip lengths, comma-separated (issue: 60,300)")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=180)
    parser.add_argument("--chunk-frames", type=int, default=16, help="the router's --video-chunk-frames")
    parser.add_argument("--fps", type=int, default=30, help="the clips' frame rate (the model samples 2 fps)")
    parser.add_argument("--sample-fps", type=float, default=0.0, help="frames sampled per second (0: the model's 2)")
    parser.add_argument("--max-pixels", type=int, default=0, help="each sampled frame's pixel cap (0: the model's); "
                        "a 5-minute clip fits the router's default 16384 vision tokens at 0.5 fps and 100352 pixels")
    parser.add_argument("--crf", default="", help="the clips' x264 quality (e.g. 40: fewer bytes for long clips)")
    parser.add_argument("--source", choices=("uri", "data"), default="uri",
                        help="how the clips are sent: uri, a file:// URI under the stack's media root (the decoder "
                             "reads the file, the router only hashes it); data, the bytes inline in the request")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--modes", default="streamed,store_and_forward")
    parser.add_argument("--skip-hf", action="store_true", help="no transformers baseline (slow on long clips)")
    parser.add_argument("--router-args", default="", help="more flags of the router (--max-vision-tokens 24576)")
    args = parser.parse_args()
    SAMPLING.update({"fps": args.sample_fps} if args.sample_fps else {})
    SAMPLING.update({"max_pixels": args.max_pixels} if args.max_pixels else {})
    model = args.model or str(build_tiny_model(pathlib.Path(tempfile.mkdtemp()) / "tiny", seed=0))
    lengths = sorted(float(s) for s in args.seconds.split(","))
    quality = {"crf": args.crf} if args.crf else None
    clips = {s: make_video(seconds=s, fps=args.fps, width=args.width, height=args.height, seed=int(s),
                           encoder_options=quality) for s in lengths}
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as media_root:
        sources = clips
        if args.source == "uri":
            sources = {s: pathlib.Path(media_root) / f"clip-{s:g}s.mp4" for s in lengths}
            for s, path in sources.items():
                path.write_bytes(clips[s])
        results = {mode: serve_mode(mode, model, sources, media_root, args) for mode in modes}
    hf = {} if args.skip_hf else hf_ttft_ms(model, clips, args.max_tokens)

    print(f"\n{args.width}x{args.height} clips at {args.fps} fps ({', '.join(f'{len(c) / 1e6:.1f}' for c in clips.values())}"
          f" MB, sent as {args.source}), {os.cpu_count()} cores, --video-chunk-frames {args.chunk_frames}")
    print("| clip | mode | TTFT ms | CPU s (all stages) | CPU s router / decoder / encoder / llm | machine bound ms "
          "| peak RSS MB router / decoder / encoder / llm |")
    print("|---|---|---|---|---|---|---|")
    for s in lengths:
        for mode in modes:
            r = results[mode][s]
            rss = " / ".join(f"{r['rss_mb'].get(stage, 0):.0f}" for stage in STAGES)
            cpu = " / ".join(f"{r['stage_cpu_s'].get(stage, 0):.1f}" for stage in STAGES)
            print(f"| {s:.0f} s | {mode} | {r['ttft_ms']:.0f} | {r['cpu_s']:.1f} | {cpu} | {r['bound_ms']:.0f} "
                  f"| {rss} |")
        if s in hf:
            print(f"| {s:.0f} s | transformers generate | {hf[s]:.0f} | | | | |")
    short, long_ = lengths[0], (300.0 if 300.0 in lengths else lengths[-1])
    if "store_and_forward" in results:
        on_paper(results["store_and_forward"][lengths[-1]]["stages_ms"], lengths[-1], args)
    main_mode = modes[0]
    first = results[main_mode][short]
    if "partly_cached_ttft_ms" in first:
        print(f"\npartly cached {short:.0f} s clip (half of {first['num_chunks']} chunks evicted): "
              f"{first['partly_cached_ttft_ms']:.0f} ms vs {first['ttft_ms']:.0f} ms uncached")
    ratio = (first["ttft_ms"] / results["store_and_forward"][short]["ttft_ms"]
             if "store_and_forward" in results and main_mode != "store_and_forward" else float("nan"))

    def growth(seconds: float) -> float:  # the router's, decoder's or encoder's, whichever grew most
        return max(results[main_mode][seconds]["rss_mb"][stage] / max(1e-9, first["rss_mb"][stage])
                   for stage in ("router", "decoder", "encoder") if stage in first["rss_mb"])

    print(f"peak RSS growth over the {short:.0f} s clip ({main_mode}): "
          + ", ".join(f"{s:.0f} s {growth(s):.2f}x" for s in lengths[1:]))
    print(f"ttft_ratio_vs_store_and_forward_60s={ratio:.2f} ttft_vs_cpu_bound_60s="
          f"{first['ttft_ms'] / max(1e-9, first['bound_ms']):.2f} peak_rss_growth_5min_vs_60s={growth(long_):.2f}")


if __name__ == "__main__":
    main()
