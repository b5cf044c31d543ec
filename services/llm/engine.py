"""The engine: a thread that loops schedule() → run() → sample → postprocess, feeding asyncio streams."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator

import torch
from transformers import AutoTokenizer, GenerationConfig

from mmserve.models import loading
from mmserve.models.family import family_of
from services.llm import metrics
from services.llm.block_manager import BlockManager
from services.llm.cuda_graphs import default_block_size
from services.llm.config import LlmConfig
from services.llm.detokenizer import IncrementalDetokenizer, TokenTexts, add_tokens
from services.llm.prompt import ChatMessage, MediaInput, PromptBuilder
from services.llm.runner import ModelRunner
from services.llm.sampler import TokenLogprobs, make_generator, model_logprobs, sample_rows, token_logprobs
from services.llm.scheduler import Scheduler
from services.llm.sequence import SamplingOptions, Sequence

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token when the request asked for them


@dataclasses.dataclass
class Finished:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    queue_ms: float
    prefill_ms: float
    ttft_ms: float
    decode_batch: float = 0.0  # mean sequences per step over the tokens after the first


def media_digest(item: MediaInput) -> str:
    """What makes two media items' KV equal: their embeddings, DeepStack features and how the rotary places them."""
    h = hashlib.sha256(f"{item.kind}:{tuple(item.grid_thw)}:{item.second_per_grid_t!r}:{item.timestamps!r}:"
                       f"{item.embeddings.dtype}:{len(item.deepstack)}".encode())
    for tensor in (item.embeddings, *item.deepstack):
        h.update(tensor.contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


class EngineOverloaded(Exception):
    """The waiting queue is full."""


@dataclasses.dataclass(eq=False)
class _Request:
    seq: Sequence
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    first_scheduled: float = 0.0
    first_token: float = 0.0
    batch_sum: int = 0  # sequences in each step that made one of its tokens after the first, summed
    decode_steps: int = 0


class Engine:
    """Continuous batching over a paged KV cache; one model step at a time in a worker thread."""

    def __init__(self, config: LlmConfig, arbiter=None):
        self.config = config
        self.arbiter = arbiter  # a unified replica's DeviceArbiter (services/unified): each step takes a turn
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = loading.resolve_device(config.device)
        dtype = loading.resolve_dtype(config.dtype, config.model, self.device)
        family = family_of(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.token_texts = TokenTexts(self.tokenizer)  # the text and bytes of tokens in log-probabilities
        self.prompts = PromptBuilder(self.tokenizer, family, loading.load_config(config.model))
        eos = GenerationConfig.from_pretrained(config.model).eos_token_id
        self.eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        self._eos_tensor = torch.tensor(self.eos_ids)
        text_model, lm_head = family.load_language_model(config.model, dtype, self.device)
        self.hidden_size = text_model.config.hidden_size  # an item's packed columns are blocks of this width
        per_token = ModelRunner.kv_bytes_per_token(text_model.config, dtype)
        block_size = config.block_size or default_block_size(self.device, dtype)
        num_blocks = max(1, config.kv_cache_bytes // (per_token * block_size))
        self.block_manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.max_model_len = min(config.max_model_len, text_model.config.max_position_embeddings)
        self.runner = ModelRunner(text_model, lm_head, self.block_manager, dtype, self.device,
                                  cuda_graphs=config.cuda_graphs, max_num_seqs=config.max_num_seqs,
                                  max_model_len=self.max_model_len)
        self._requests: dict[str, _Request] = {}
        self._incoming: list[_Request] = []
        self._aborted: list[str] = []
        self._wake = threading.Condition()
        self._stopped = False
        self._preemptions_seen = 0
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        log.info("KV cache: %d blocks of %d tokens on %s, %s", num_blocks, block_size, self.device, dtype)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def prepare(self, request_id: str, messages: list[ChatMessage], options: SamplingOptions,
                priority: float = 0.0) -> Sequence:
        """Tokenises and validates a request (raises ValueError for a bad one) without queueing it."""
        ids, mm = self.prompts.build(messages)
        if len(ids) + options.max_tokens > self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens plus max_tokens={options.max_tokens} exceed the "
                             f"context length of {self.max_model_len}")
        spans = [(start, end, media_digest(item)) for (start, end), item in zip(mm.spans, mm.media)]
        return Sequence(request_id, ids, options, priority=priority, mm=mm, media_spans=spans)

    async def generate(self, seq: Sequence) -> AsyncIterator[Delta | Finished]:
        """Runs a prepared sequence, yielding deltas then one Finished; aborts it if the caller goes away."""
        if len(self._requests) >= self.config.max_num_seqs + self.config.max_queue:
            raise EngineOverloaded(f"llm: {len(self._requests)} requests in flight, the queue is full")
        if seq.seq_id in self._requests:
            raise ValueError(f"request_id: {seq.seq_id!r} is already running")
        if not self.scheduler.fits(seq):
            raise ValueError(f"prompt: {seq.num_tokens} tokens plus max_tokens do not fit the KV cache")
        request = _Request(seq, asyncio.get_running_loop(), asyncio.Queue(),
                           IncrementalDetokenizer(self.tokenizer, seq.sampling.stop),
                           None if seq.sampling.is_greedy else make_generator(seq.sampling.seed))
        with self._wake:
            self._requests[seq.seq_id] = request
            self._incoming.append(request)
            self._wake.notify()
        finished = False
        try:
            while not finished:
                event = await request.events.get()
                if isinstance(event, Exception):
                    raise event
                finished = isinstance(event, Finished)
                yield event
        finally:
            if not finished:
                self.abort(seq.seq_id)

    def abort(self, request_id: str) -> None:
        """Stops a request and frees its KV blocks at the next step boundary."""
        with self._wake:
            self._aborted.append(request_id)
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopped or self._incoming or self._aborted or self.scheduler.has_work):
                    self._wake.wait()
                if self._stopped:
                    return
                for request in self._incoming:
                    self.scheduler.add(request.seq)
                self._incoming.clear()
                for request_id in self._aborted:
                    request = self._requests.pop(request_id, None)
                    if request is not None:
                        self.scheduler.finish(request.seq, "abort")
                self._aborted.clear()
            if self.arbiter is not None:
                self.arbiter.acquire_step(self.scheduler)
            try:
                self._step()
            except Exception:  # a model error must not kill the loop silently
                log.exception("engine step failed; failing the running requests")
                self._fail_all()
            finally:
                if self.arbiter is not None:
                    self.arbiter.release_step(self.scheduler)

    @torch.inference_mode()
    def _step(self) -> None:
        chunks = self.scheduler.schedule()
        if not chunks:
            self._report_occupancy()  # e.g. the last request was aborted: the gauges must fall to zero
            return
        start = now = time.monotonic()
        for chunk in chunks:
            request = self._requests[chunk.seq.seq_id]
            if not request.first_scheduled:
                request.first_scheduled = now
                metrics.PROMPT_TOKENS.inc(chunk.seq.num_prompt_tokens)
                metrics.CACHED_PROMPT_TOKENS.inc(chunk.seq.num_cached_tokens)
        logits = self.runner.run(chunks)
        seqs = [c.seq for c in chunks if c.completes_sequence]
        # Only the rows that ask pay for log-probabilities, taken before min_tokens masks end-of-sequence.
        wanted = [row for row, seq in enumerate(seqs) if seq.sampling.logprobs]
        log_probs = model_logprobs(logits[wanted]) if wanted else None
        too_short = [row for row, seq in enumerate(seqs) if seq.num_output_tokens < seq.sampling.min_tokens]
        if too_short:
            logits[torch.tensor(too_short)[:, None], self._eos_tensor] = float("-inf")
        tokens = sample_rows(logits, [seq.sampling for seq in seqs],
                             [self._requests[seq.seq_id].generator for seq in seqs])
        self.scheduler.postprocess(chunks, dict(zip(seqs, tokens)))
        logprobs = {}
        if wanted:
            logprobs = dict(zip(wanted, token_logprobs(log_probs, [tokens[row] for row in wanted],
                                                       [seqs[row].sampling.top_logprobs for row in wanted])))
        now = time.monotonic()
        self._emit([self._requests[seq.seq_id] for seq in seqs], tokens, logprobs, now, len(chunks))
        self._observe(chunks, len(seqs), now - start)

    def _observe(self, chunks, num_generated: int, seconds: float) -> None:
        metrics.STEP_SECONDS.observe(seconds)
        metrics.STEP_TOKENS.observe(sum(c.num_new_tokens for c in chunks))
        metrics.GENERATED_TOKENS.inc(num_generated)
        metrics.PREEMPTIONS.inc(self.scheduler.num_preemptions - self._preemptions_seen)
        self._preemptions_seen = self.scheduler.num_preemptions
        self._report_occupancy()

    def _report_occupancy(self) -> None:
        metrics.RUNNING.set(len(self.scheduler.running))
        metrics.WAITING.set(len(self.scheduler.waiting))
        metrics.KV_BLOCKS_USED.set(self.block_manager.num_blocks - self.block_manager.num_free_blocks)

    def _emit(self, requests: list[_Request], tokens: list[int], logprobs: dict[int, TokenLogprobs], now: float,
              batch: int) -> None:
        """Hands each request its new token (with its log-probabilities, by row, when asked): stop checks and
        detokenisation for the whole batch at once, and one wake-up of each event loop for all its events."""
        is_eos = [token in self.eos_ids for token in tokens]
        texts = [(r.detokenizer, token) for r, token, eos in zip(requests, tokens, is_eos) if not eos]
        is_stop_string = iter(add_tokens([d for d, _ in texts], [token for _, token in texts]))
        events = []
        for row, (request, token, eos) in enumerate(zip(requests, tokens, is_eos)):
            seq = request.seq
            if request.first_token:
                request.batch_sum += batch
                request.decode_steps += 1
            request.first_token = request.first_token or now
            reason = None
            if eos or next(is_stop_string):
                reason = "stop"
            elif seq.num_output_tokens >= seq.sampling.max_tokens or seq.num_tokens >= self.max_model_len:
                reason = "length"
            if reason is not None and request.detokenizer.finish():
                reason = "stop"  # the held-back end of the text completed a stop string
            events.append((request, Delta(request.detokenizer.delta(final=reason is not None), [token],
                                          (logprobs[row],) if row in logprobs else ())))
            if reason is not None:
                events.append((request, self._finish(request, reason)))
        self._send(events)

    def _finish(self, request: _Request, reason: str) -> Finished:
        seq = request.seq
        metrics.FINISHED.labels(reason).inc()
        self.scheduler.finish(seq, reason)
        self._requests.pop(seq.seq_id, None)
        start = seq.arrival_time
        return Finished(reason, seq.num_prompt_tokens, seq.num_output_tokens,
                        queue_ms=(request.first_scheduled - start) * 1e3,
                        prefill_ms=(request.first_token - request.first_scheduled) * 1e3,
                        ttft_ms=(request.first_token - start) * 1e3,
                        decode_batch=request.batch_sum / request.decode_steps if request.decode_steps else 0.0)

    @staticmethod
    def _send(events: list[tuple[_Request, object]]) -> None:
        # One call_soon_threadsafe per loop and step, not per token: each call writes to the loop's wake-up pipe.
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request, event in events:
            by_loop.setdefault(request.loop, []).append((request.events, event))
        for loop, deliveries in by_loop.items():
            loop.call_soon_threadsafe(_deliver, deliveries)

    def _fail_all(self) -> None:
        for request in self._requests.values():
            self.scheduler.finish(request.seq, "error")
        self._send([(request, RuntimeError("llm: model step failed")) for request in self._requests.values()])
        self._requests.clear()


def _deliver(deliveries: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, event in deliveries:
        queue.put_nowait(event)
