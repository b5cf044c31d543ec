"""LLM engine benchmark: step efficiency vs the bare forward, throughput vs transformers, stall-free decoding.

    python benchmarks/llm_engine.py [--family qwen2_5_vl|qwen3_vl|internvl] [--preset tiny|PRESET|both]
                                    [--requests 64] [--max-output 24] [--only a|ab] [--num-threads N]

--family picks the checkpoint family (built by its own tiny-model builder; "both" runs its tiny preset and its
real-widths one: qwen2.5-vl-3b-width, qwen3-vl-2b-width, internvl3-1b-width); the floor loads the family's language
model, transformers runs the family's own class.

(a) decode step time at batch 1, 8, 32 against the same weights' bare forward on pre-built inputs
    (HF text model + lm_head with a pre-filled DynamicCache): efficiency = floor / engine step;
(b) N requests of mixed prompt and output lengths (8-160 words, 4-max-output tokens): engine total time
    vs transformers' generate one request at a time;
(c) p99 and mean time between tokens of 8 decoding requests while long prompts arrive, with chunked prefill
    (256-token budget), without (one step takes the whole prompt), and with a 40 ms time-per-token target on
    the decoding requests (the default 2,048-token budget; StepBudget holds each step to their due times).
Last line: engine_efficiency_b32=X speedup_vs_hf=Y (the largest preset run).
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import random
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForImageTextToText, DynamicCache

from mmserve.models import loading
from mmserve.models.family import family_of
from mmserve.models.tiny import build_family_model
from services.llm.config import LlmConfig
from services.llm.engine import Engine, Finished
from services.llm.prompt import ChatMessage
from services.llm.sequence import SamplingOptions

# Each family's presets: the tiny test model first, the real-widths one (few layers) last.
PRESETS = {"qwen2_5_vl": ["tiny", "small", "qwen2.5-vl-3b-width"], "qwen3_vl": ["tiny", "qwen3-vl-2b-width"],
           "internvl": ["tiny", "tiny-qwen3", "internvl3-1b-width"]}
TPOT_TARGET_MS = 40.0  # (c): the decoding requests' time-per-token target, held by the engine's StepBudget
WORDS = "the quick brown fox jumps over a lazy dog while seven birds sing about rivers and mountains".split()


def prompt_text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


engine_token_times: dict[str, list[float]] = {}


async def stream(engine: Engine, seq) -> list[float]:
    """Token arrival times of one request (also kept in engine_token_times if the stream is cancelled)."""
    times = engine_token_times.setdefault(seq.seq_id, [])
    async for event in engine.generate(seq):
        if not isinstance(event, Finished):
            times.append(time.perf_counter())
    return engine_token_times.pop(seq.seq_id)


def greedy(n: int) -> SamplingOptions:
    return SamplingOptions(max_tokens=n, min_tokens=n, temperature=0.0)


async def engine_step_ms(model: str, batch: int, num_tokens: int = 40, prompt_words: int = 24,
                         num_threads: int = 0) -> tuple[float, int]:
    """Median time between tokens while `batch` sequences decode together (= one engine step), and the mean
    context length of the steps measured."""
    engine = Engine(LlmConfig(model=model, max_num_seqs=batch, num_threads=num_threads))
    engine.start()
    try:
        rng = random.Random(batch)
        seqs = [engine.prepare(f"s{i}", [ChatMessage("user", [prompt_text(rng, prompt_words)])], greedy(num_tokens))
                for i in range(batch)]
        arrivals = await asyncio.gather(*(stream(engine, s) for s in seqs))
        gaps = [b - a for times in arrivals for a, b in zip(times[10:-5], times[11:-5])]
        context = statistics.mean(s.num_prompt_tokens for s in seqs) + (10 + num_tokens - 5) / 2
        return statistics.median(gaps) * 1e3, round(context)
    finally:
        engine.stop()


def _dtype(model: str) -> torch.dtype:
    """What the engine's default dtype ("auto") computes in here: the floor and transformers use the same."""
    return loading.resolve_dtype("auto", model, torch.device("cpu"))


@torch.inference_mode()
def floor_step_ms(model: str, batch: int, context: int = 52, steps: int = 20) -> float:
    """The same weights' forward for one decode token per sequence, inputs and cache built beforehand."""
    text_model, lm_head = family_of(model).load_language_model(model, _dtype(model), torch.device("cpu"))
    ids = torch.randint(0, 1000, (batch, context))
    cache = DynamicCache(config=text_model.config)
    text_model(input_ids=ids, past_key_values=cache, use_cache=True)
    times = []
    next_ids = torch.randint(0, 1000, (batch, 1))
    for _ in range(steps):
        start = time.perf_counter()
        hidden = text_model(input_ids=next_ids, past_key_values=cache, use_cache=True).last_hidden_state
        (hidden[:, -1] @ lm_head.T).argmax(-1)
        times.append(time.perf_counter() - start)
        cache.crop(-1)  # drop the token just added: same context length every step
    return statistics.median(times) * 1e3


def mixed_workload(n: int, max_output: int, seed: int = 0) -> list[tuple[str, int]]:
    """Prompts of 8-160 words and answers of 4-max_output tokens, uniformly."""
    rng = random.Random(seed)
    return [(prompt_text(rng, rng.randint(8, 160)), rng.randint(4, max_output)) for _ in range(n)]


async def engine_total_s(model: str, workload) -> float:
    engine = Engine(LlmConfig(model=model, max_num_seqs=len(workload)))
    engine.start()
    try:
        seqs = [engine.prepare(f"m{i}", [ChatMessage("user", [text])], greedy(n))
                for i, (text, n) in enumerate(workload)]
        start = time.perf_counter()
        await asyncio.gather(*(stream(engine, s) for s in seqs))
        return time.perf_counter() - start
    finally:
        engine.stop()


@torch.inference_mode()
def hf_total_s(model: str, workload) -> float:
    """transformers' generate one request at a time, as a user would call it."""
    from transformers import AutoTokenizer

    hf = AutoModelForImageTextToText.from_pretrained(model, dtype=_dtype(model)).eval()  # the family's own class
    tokenizer = AutoTokenizer.from_pretrained(model)
    start = time.perf_counter()
    for text, n in workload:
        chat = [{"role": "user", "content": [{"type": "text", "text": text}]}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        hf.generate(**ids, do_sample=False, max_new_tokens=n, min_new_tokens=n)
    return time.perf_counter() - start


async def tbt_ms(model: str, budget: int, long_words: int, num_long: int = 6,
                     tpot_ms: float = 0.0) -> tuple[float, float]:
    """p99 and mean gap between tokens of 8 decoding requests (each with the time-per-token target tpot_ms, 0:
    none) during a window in which long prompts keep arriving."""
    engine = Engine(LlmConfig(model=model, max_num_batched_tokens=budget))
    engine.start()
    try:
        rng = random.Random(7)
        decoders = [engine.prepare(f"d{i}", [ChatMessage("user", [prompt_text(rng, 16)])], greedy(30000),
                                   tpot_ms=tpot_ms) for i in range(8)]
        tasks = [asyncio.create_task(stream(engine, s)) for s in decoders]
        await asyncio.sleep(0.5)  # all eight are decoding
        window_start = time.perf_counter()
        for i in range(num_long):
            seq = engine.prepare(f"l{i}", [ChatMessage("user", [prompt_text(rng, long_words)])], greedy(1))
            await asyncio.gather(stream(engine, seq), asyncio.sleep(0.05))
        window_end = time.perf_counter()
        for task in tasks:
            task.cancel()
        gaps = []
        for seq in decoders:
            times = [t for t in engine_token_times.pop(seq.seq_id, []) if window_start <= t <= window_end]
            gaps += [b - a for a, b in zip(times, times[1:])]
        gaps.sort()
        return gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] * 1e3, statistics.mean(gaps) * 1e3
    finally:
        engine.stop()


def step_efficiency(model: str, batches=(1, 8, 32), num_threads: int = 0) -> dict[int, float]:
    """(a): the engine's decode step against the bare forward at each batch, both on num_threads torch threads
    (0: torch's default); prints a row per batch."""
    print(f"(a) decode step, ms       {'batch':>6} {'engine':>9} {'floor':>9} {'efficiency':>11}")
    if num_threads:
        torch.set_num_threads(num_threads)
    efficiency = {}
    for batch in batches:
        engine_ms, context = asyncio.run(engine_step_ms(model, batch, num_threads=num_threads))
        floor_ms = floor_step_ms(model, batch, context)  # over as many tokens as the engine's steps attend to
        efficiency[batch] = floor_ms / engine_ms
        print(f"{'':26}{batch:>6} {engine_ms:>9.2f} {floor_ms:>9.2f} {efficiency[batch]:>11.2f}")
    return efficiency


def run_preset(family: str, preset: str, workdir: pathlib.Path, num_requests: int, max_output: int,
               only: str = "", num_threads: int = 0) -> tuple[float, float]:
    model = str(build_family_model(family, workdir / preset, seed=0, preset=preset))
    print(f"\n== {preset} ==" if family == "qwen2_5_vl" else f"\n== {family} {preset} ==")
    efficiency = step_efficiency(model, num_threads=num_threads)
    if only == "a":
        return efficiency[32], float("nan")
    workload = mixed_workload(num_requests, max_output)
    engine_s = asyncio.run(engine_total_s(model, workload))
    hf_s = hf_total_s(model, workload)
    speedup = hf_s / engine_s
    print(f"(b) {num_requests} mixed requests (answers of 4-{max_output} tokens): engine {engine_s:.1f} s, "
          f"transformers one at a time {hf_s:.1f} s, speed-up {speedup:.1f}x")
    if only == "ab":
        return efficiency[32], speedup
    long_words = 1500 if preset == "tiny" else 600
    print(f"(c) time between tokens while ~{long_words}-word prompts arrive, p99 / mean ms:")
    for name, budget, tpot_ms in (("chunked prefill (256-token budget)", 256, 0.0),
                                  ("without (one step takes the whole prompt)", 8192, 0.0),
                                  (f"the {TPOT_TARGET_MS:.0f} ms target of the decoding requests (2,048-token budget)",
                                   2048, TPOT_TARGET_MS)):
        p99, mean = asyncio.run(tbt_ms(model, budget, long_words, tpot_ms=tpot_ms))
        print(f"    {name}: {p99:.1f} / {mean:.1f}")
    return efficiency[32], speedup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_5_vl", choices=sorted(PRESETS))
    parser.add_argument("--preset", default="both",
                        choices=sorted({p for ps in PRESETS.values() for p in ps} | {"both"}))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-output", type=int, default=24, help="longest answer of (b), in tokens (24 keeps the "
                                                                    "run short; chat answers run to hundreds)")
    parser.add_argument("--only", choices=["a", "ab"], help="run only part (a), the step efficiency, or (a) and (b)")
    parser.add_argument("--num-threads", type=int, default=0,
                        help="torch threads of (a)'s engine and floor alike (0: torch's default). On a machine whose "
                             "cores others use too, 1: a thread team waits at every barrier for a descheduled peer")
    args = parser.parse_args()
    if args.preset not in PRESETS[args.family] + ["both"]:
        parser.error(f"--preset {args.preset} is not one of {args.family}'s: {', '.join(PRESETS[args.family])}")
    presets = [PRESETS[args.family][0], PRESETS[args.family][-1]] if args.preset == "both" else [args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_preset(args.family, p, pathlib.Path(tmp), args.requests, args.max_output, args.only or "",
                              args.num_threads) for p in presets]
    efficiency, speedup = results[-1]
    print(f"engine_efficiency_b32={efficiency:.2f} speedup_vs_hf={speedup:.1f}")


if __name__ == "__main__":
    main()
