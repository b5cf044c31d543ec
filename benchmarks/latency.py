"""Lone-request latency: mmserve over gRPC and over its OpenAI endpoint against transformers in-process.

    python benchmarks/latency.py [--preset small] [--model DIR] [--rounds 10] [--max-tokens 32] [--skip-efficiency]
                                 [--num-threads N]

One run, the same checkpoint and dtype (`auto`) everywhere. Per case (lone text, a 224² and a 448² image, an
8-frame video): TTFT and time per output token (TPOT), best and median of --rounds, each request alone, after one
warm-up. TTFT is the client's: request sent to the first token (gRPC) or the first non-empty text chunk (OpenAI
client, streaming). transformers runs in this process on the parity tests' inputs (`mmserve/hf_inputs.py`): its
TTFT is its processor plus prefill, its TPOT its own decode step (forward plus sampling), both from a streamer.
Also `mmserve up` to healthy (the "router listening" line) and the idle RSS summed over its processes, and the
engine's step efficiency at batch 32 (`llm_engine.py`).
Last line: tpot_vs_hf=X image_ttft_vs_hf=Y efficiency_b32_small=Z (mmserve over gRPC against transformers: median
TPOT over all cases, median TTFT of the 224² image; X, Y ≤ 1.1 and 1.2 are the targets).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import mmserve  # noqa: F401  (first: turns gRPC's fork handlers off before grpc loads; see its __init__)
import openai
import torch
from transformers.generation.streamers import BaseStreamer

from mmserve import rpc
from mmserve.media.samples import make_image, make_video
from mmserve.models.tiny import build_tiny_model
from mmserve.v1 import api_pb2, api_pb2_grpc
from stack.ports import free_port
from workload import LOOSE_SLO_CAPS

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from hf_baseline import HfModel  # noqa: E402
from llm_engine import step_efficiency  # noqa: E402

PROMPT = "Describe what you see in detail."
# Loose targets: a lone request on a busy shared machine must not be refused by the router's SLO admission.
LOOSE_SLO_MS = 600_000


CASES = ("text", "image 224²", "image 448²", "video 8 frames")
Sample = tuple[str, bytes, str, str]  # media kind ("" for text), its bytes, mime type, prompt


def samples(case: str, n: int, seed: int) -> list[Sample]:
    """n requests of a case, each with its own media and prompt, so neither mmserve's embedding cache nor its
    prefix cache answers one from another (only the shared system prompt's first block can hit)."""
    out = []
    for i in range(seed, seed + n):
        prompt = f"Request {i}: {PROMPT}"
        if case == "text":
            out.append(("", b"", "", prompt))
        elif case.startswith("image"):
            side = int(case.split()[1].rstrip("²"))
            out.append(("image", make_image(width=side, height=side, seed=i), "image/png", prompt))
        else:  # a 4 s clip is sampled at 2 fps: 8 frames
            out.append(("video", make_video(seconds=4.0, fps=10, width=224, height=224, seed=i), "video/mp4", prompt))
    return out


def grpc_request(sample: Sample, num_tokens: int) -> api_pb2.GenerateRequest:
    kind, data, _, prompt = sample
    parts = [api_pb2.Part(**{kind: api_pb2.Media(data=data)})] if kind else []
    parts.append(api_pb2.Part(text=prompt))
    return api_pb2.GenerateRequest(
        messages=[api_pb2.Message(role="user", parts=parts)],
        sampling=api_pb2.SamplingParams(max_tokens=num_tokens, min_tokens=num_tokens, temperature=0.0),
        slo=api_pb2.Slo(ttft_ms=LOOSE_SLO_MS, tpot_ms=LOOSE_SLO_MS))


class Clock:
    """Times one request from its start: first token, last token, tokens seen."""

    def __init__(self):
        self.start, self.first, self.last, self.num_tokens = time.perf_counter(), 0.0, 0.0, 0

    def tokens(self, n: int) -> None:
        self.last = time.perf_counter()
        self.first = self.first or self.last
        self.num_tokens += n

    def result(self, num_tokens: int = 0) -> tuple[float, float]:
        """(TTFT ms, TPOT ms); num_tokens overrides the count seen (the OpenAI stream sends text, not tokens). NaN
        when nothing was seen: an answer whose tokens all decode to no text (a random model's special tokens)
        streams no text to time."""
        if not self.first:
            return math.nan, math.nan
        n = num_tokens or self.num_tokens
        return (self.first - self.start) * 1e3, (self.last - self.first) * 1e3 / max(1, n - 1)


async def via_grpc(stub, request: api_pb2.GenerateRequest) -> tuple[float, float]:
    clock = Clock()
    async for reply in stub.Generate(request, timeout=300):
        if reply.WhichOneof("event") == "delta" and reply.delta.token_ids:
            clock.tokens(len(reply.delta.token_ids))
    return clock.result()


def via_openai(client: openai.OpenAI, model: str, sample: Sample, num_tokens: int) -> tuple[float, float]:
    kind, data, mime, prompt = sample
    url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    content = [{"type": f"{kind}_url", f"{kind}_url": {"url": url}}] if kind else []
    content.append({"type": "text", "text": prompt})
    clock, usage = Clock(), None
    extra = {"min_tokens": num_tokens, "ttft_ms": LOOSE_SLO_MS, "tpot_ms": LOOSE_SLO_MS}
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], stream=True,
                                            max_tokens=num_tokens, temperature=0.0, extra_body=extra,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            clock.tokens(1)
        usage = chunk.usage or usage
    return clock.result(usage.completion_tokens)


class TimingStreamer(BaseStreamer):
    """transformers' streamer interface: the first put is the prompt, then one put per generated token."""

    def __init__(self, clock: Clock):
        self.clock, self.is_prompt = clock, True

    def put(self, value: torch.Tensor) -> None:
        if self.is_prompt:
            self.is_prompt = False
        else:
            self.clock.tokens(value.numel())

    def end(self) -> None:
        pass


@torch.inference_mode()
def via_transformers(hf: HfModel, request: api_pb2.GenerateRequest, num_tokens: int) -> tuple[float, float]:
    clock = Clock()
    inputs = hf.inputs.for_request(request)
    hf.model.generate(**inputs, do_sample=False, max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                      streamer=TimingStreamer(clock))
    return clock.result()


def idle_rss_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process and all its descendants, by command (MB), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(pathlib.Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    rss, todo = {}, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            status = pathlib.Path(f"/proc/{p}/status").read_text()
            argv = pathlib.Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        name = ("forkserver" if b"forkserver" in b" ".join(argv) else
                next((a.decode() for a in argv if a.startswith((b"services.", b"up"))), argv[0].decode()))
        rss[f"{name} ({p})"] = kb / 1024
    return rss


def start_up(model: str, port: int, http_port: int) -> tuple[subprocess.Popen, float]:
    """`mmserve up` with the OpenAI endpoint; returns it and the seconds until it said it was healthy."""
    start = time.perf_counter()
    up = subprocess.Popen([sys.executable, "-m", "stack.cli", "up", "--model", model, "--port", str(port),
                           "--http-port", str(http_port), "--log-level", "WARNING",
                           "--router-flags", " ".join(LOOSE_SLO_CAPS)],
                          stdout=subprocess.PIPE, text=True)
    for line in up.stdout:
        if "router listening" in line:
            return up, time.perf_counter() - start
    raise RuntimeError(f"mmserve up exited with {up.wait()} before it was healthy")


def summary(timed: list[tuple[float, float]]) -> tuple[float, float, float, float]:
    """best and median TTFT, best and median TPOT, over the requests that were timed (NaN when none was)."""
    timed = [t for t in timed if not math.isnan(t[0])]
    if not timed:
        return (math.nan,) * 4
    ttft, tpot = [t[0] for t in timed], [t[1] for t in timed]
    return min(ttft), statistics.median(ttft), min(tpot), statistics.median(tpot)


async def serve_cases(address: str, client: openai.OpenAI, model_name: str, rounds: int, num_tokens: int):
    """Every case alone, rounds times after one warm-up, over gRPC and over the OpenAI endpoint in turn."""
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    async with rpc.channel(address, 64 << 20) as channel:
        stub = api_pb2_grpc.RouterStub(channel)
        for case in CASES:
            by_grpc, by_openai = samples(case, rounds + 1, 1000), samples(case, rounds + 1, 2000)
            for round_, (g, o) in enumerate(zip(by_grpc, by_openai)):
                g = await via_grpc(stub, grpc_request(g, num_tokens))
                o = await asyncio.to_thread(via_openai, client, model_name, o, num_tokens)
                if round_:  # the first warms lazy paths
                    results.setdefault(("mmserve gRPC", case), []).append(g)
                    results.setdefault(("mmserve OpenAI", case), []).append(o)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="tiny-model preset to build (ignored with --model)")
    parser.add_argument("--model", default="", help="an existing checkpoint directory")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (min_tokens too: fixed length)")
    parser.add_argument("--skip-efficiency", action="store_true", help="do not run llm_engine's batch-32 step")
    parser.add_argument("--num-threads", type=int, default=0, help="torch threads of the efficiency step (see "
                                                                    "llm_engine.py --num-threads)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_tiny_model(pathlib.Path(tmp) / args.preset, seed=0, preset=args.preset))
        print(f"model {model}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
        port, http_port = free_port(), free_port()
        up, startup_s = start_up(model, port, http_port)
        try:
            time.sleep(2.0)  # idle: let start-up's transient buffers go
            rss = idle_rss_mb(up.pid)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=0)
            model_name = client.models.list().data[0].id
            results = asyncio.run(serve_cases(f"127.0.0.1:{port}", client, model_name, args.rounds, args.max_tokens))
        finally:
            up.terminate()
            up.wait(60)
        hf = HfModel(model)
        via_transformers(hf, grpc_request(samples("image 224²", 1, 0)[0], args.max_tokens), args.max_tokens)  # warm-up
        for case in CASES:
            timed = [via_transformers(hf, grpc_request(s, args.max_tokens), args.max_tokens)
                     for s in samples(case, args.rounds + 1, 1000)]
            results[("transformers", case)] = timed[1:]
        efficiency = float("nan") if args.skip_efficiency else step_efficiency(model, (8, 32), args.num_threads)[32]
    print(f"\nmmserve up to healthy {startup_s:.1f} s; idle RSS {sum(rss.values()):.0f} MB summed: "
          + ", ".join(f"{k} {v:.0f}" for k, v in sorted(rss.items())))
    print(f"\n{'system':16} {'case':16} {'TTFT best':>10} {'median':>8} {'TPOT best':>10} {'median':>8}  (ms)")
    for (system, case), timed in sorted(results.items(), key=lambda kv: (CASES.index(kv[0][1]), kv[0][0])):
        print(f"{system:16} {case:16} " + " ".join(f"{v:>{w}.1f}" for v, w in zip(summary(timed), (10, 8, 10, 8))))
    median = lambda system, name, i: summary(results[(system, name)])[i]  # noqa: E731
    tpot_ratio = statistics.median(median("mmserve gRPC", c, 3) / median("transformers", c, 3) for c in CASES)
    image_ratio = median("mmserve gRPC", "image 224²", 1) / median("transformers", "image 224²", 1)
    print(f"tpot_vs_hf={tpot_ratio:.2f} image_ttft_vs_hf={image_ratio:.2f} efficiency_b32_small={efficiency:.2f}")


if __name__ == "__main__":
    main()
