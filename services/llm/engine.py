"""The engine: a thread that loops schedule() → run() → sample → postprocess, feeding asyncio streams."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator

import torch
from transformers import AutoTokenizer, GenerationConfig

from mmserve.models import loading
from mmserve.models.family import EncodedItem, family_of
from services.llm import metrics
from services.llm.block_manager import BlockManager
from services.llm.cuda_graphs import default_block_size
from services.llm.config import LlmConfig
from services.llm.detokenizer import IncrementalDetokenizer, TokenTexts, add_tokens
from services.llm.events import Delta, Finished, coalesced
from services.llm.prompt import ChatMessage, MediaInput, PromptBuilder
from services.llm.runner import ModelRunner
from services.llm.sampler import TokenLogprobs, make_generator, model_logprobs, sample_rows, token_logprobs
from services.llm.scheduler import Scheduler
from services.llm.sequence import SamplingOptions, Sequence
from services.llm.step_budget import StepBudget

log = logging.getLogger(__name__)


def media_digest(item: MediaInput) -> str:
    """What makes two media items' KV equal: their embeddings, DeepStack features and how the rotary places them.

    A streamed item's embeddings are not all there when prefill starts: the router's media key (the bytes'
    digest, preprocessing and encoder) names them instead; an item without one never matches another.
    """
    h = hashlib.sha256(f"{item.kind}:{tuple(item.grid_thw)}:{item.second_per_grid_t!r}:{item.timestamps!r}:".encode())
    if item.embeddings is None:
        h.update(f"streamed:{item.digest or uuid.uuid4().hex}".encode())
        return h.hexdigest()
    h.update(f"{item.embeddings.dtype}:{len(item.deepstack)}".encode())
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
    batch_sum: int = 0  # sequences in each step that made one of its tokens after the first, summed
    decode_steps: int = 0
    media_wait_since: float = 0.0  # when its prefill last ran out of arrived media chunks (0: it has not)
    media_wait_s: float = 0.0  # time its prefill spent waiting for media chunks


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
        self.block_manager = BlockManager(num_blocks, block_size, config.prefix_caching)
        self.step_budget = StepBudget(config.max_num_batched_tokens, share=config.step_tpot_share,
                                      min_tokens=config.min_prefill_tokens,
                                      max_ahead_tokens=config.step_max_ahead_tokens)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.step_budget)
        self.max_model_len = min(config.max_model_len, text_model.config.max_position_embeddings)
        self.runner = ModelRunner(text_model, lm_head, self.block_manager, dtype, self.device,
                                  cuda_graphs=config.cuda_graphs, max_num_seqs=config.max_num_seqs,
                                  max_model_len=self.max_model_len)
        self._requests: dict[str, _Request] = {}
        self._incoming: list[_Request] = []
        self._aborted: list[str] = []
        self._arrived: list[tuple[Sequence, int, EncodedItem]] = []  # streamed media chunks to hand over
        self._failed: list[tuple[Sequence, Exception]] = []
        self._is_idle = False  # the last step found nothing to run: wait for news, do not spin
        self.num_idle_steps = 0  # steps that found nothing to run
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
                priority: float = 0.0, tpot_ms: float = 0.0) -> Sequence:
        """Tokenises and validates a request (raises ValueError for a bad one) without queueing it; tpot_ms: its
        time-per-token target (0: none)."""
        ids, mm = self.prompts.build(messages)
        if len(ids) + options.max_tokens > self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens plus max_tokens={options.max_tokens} exceed the "
                             f"context length of {self.max_model_len}")
        spans = [(start, end, media_digest(item)) for (start, end), item in zip(mm.spans, mm.media)]
        seq = Sequence(request_id, ids, options, priority=priority, tpot_ms=tpot_ms, mm=mm, media_spans=spans)
        if mm.streamed is not None:
            seq.is_streamed = True
            seq.pending_media = {i: mm.streamed.token_span(i) for i in range(mm.streamed.num_chunks)}
        return seq

    def generate(self, seq: Sequence) -> AsyncIterator[Delta | Finished]:
        """Queues a prepared sequence (raising EngineOverloaded or ValueError at once) and returns its events:
        deltas then one Finished; iterating them and going away aborts the sequence."""
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
        return self._events(request)

    async def _events(self, request: _Request) -> AsyncIterator[Delta | Finished]:
        finished = False
        try:
            async for event in coalesced(request.events):
                finished = isinstance(event, Finished)
                yield event
        finally:
            if not finished:
                self.abort(request.seq.seq_id)

    def abort(self, request_id: str) -> None:
        """Stops a request and frees its KV blocks at the next step boundary."""
        with self._wake:
            self._aborted.append(request_id)
            self._wake.notify()

    def put_chunk(self, seq: Sequence, index: int, chunk: EncodedItem) -> None:
        """Hands over a streamed media chunk (index in prompt order); prefill continues at the next step."""
        with self._wake:
            self._arrived.append((seq, index, chunk))
            self._wake.notify()

    def fail(self, seq: Sequence, error: Exception) -> None:
        """Ends a sequence with error (its events raise it), freeing its blocks and media at the next step."""
        with self._wake:
            self._failed.append((seq, error))
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                # A step that found nothing to run (e.g. every sequence waits for media) is not repeated until
                # something arrives: new requests, chunks, aborts or failures.
                while not (self._stopped or self._incoming or self._aborted or self._arrived or self._failed
                           or (self.scheduler.has_work and not self._is_idle)):
                    self._wake.wait()
                if self._stopped:
                    return
                self._take_news()
            if self.arbiter is not None:
                self.arbiter.acquire_step(self.scheduler)
            did_work = False
            try:
                did_work = self._step()
                self._is_idle = not did_work
            except Exception:  # a model error must not kill the loop silently
                log.exception("engine step failed; failing the running requests")
                self._fail_all()
            finally:
                if self.arbiter is not None:  # a step that ran something is followed at once by the next
                    self.arbiter.release_step(self.scheduler, will_step_again=did_work)

    def _take_news(self) -> None:
        """Applies what the event loops handed over since the last step (called holding the lock)."""
        self._is_idle = False
        for request in self._incoming:
            self.scheduler.add(request.seq)
        self._incoming.clear()
        for request_id in self._aborted:
            request = self._requests.pop(request_id, None)
            if request is not None:
                self._end(request.seq, "abort")
        self._aborted.clear()
        now = time.monotonic()
        for seq, index, chunk in self._arrived:
            metrics.MEDIA_CHUNKS.inc()
            if seq.is_finished or index not in seq.pending_media:
                continue  # ended meanwhile: the chunk is dropped here
            seq.mm.streamed.put(index, chunk, seq.num_computed_tokens)
            del seq.pending_media[index]
            request = self._requests.get(seq.seq_id)
            if request is not None and request.seq is seq and request.media_wait_since:
                request.media_wait_s += now - request.media_wait_since
                request.media_wait_since = 0.0
            if request is not None and not seq.pending_media:
                metrics.MEDIA_WAIT_SECONDS.observe(request.media_wait_s)
        self._arrived.clear()
        failed = [(self._requests.pop(seq.seq_id), error) for seq, error in self._failed
                  if self._requests.get(seq.seq_id) is not None and self._requests[seq.seq_id].seq is seq]
        self._failed.clear()
        for request, _ in failed:
            self._end(request.seq, "error")
        self._send(failed)

    def _end(self, seq: Sequence, reason: str) -> None:
        """Finishes seq, freeing its blocks and any streamed media chunks it still holds at once."""
        self.scheduler.finish(seq, reason)
        if seq.mm.streamed is not None:
            seq.mm.streamed.clear()
        seq.pending_media.clear()

    @torch.inference_mode()
    def _step(self) -> bool:
        """One schedule → run → sample → postprocess; False when nothing could run."""
        chunks = self.scheduler.schedule()
        self._drop_preempted()
        if not chunks:
            self.num_idle_steps += 1
            self._report_occupancy()  # e.g. the last request was aborted: the gauges must fall to zero
            return False
        num_decoding = sum(chunk.seq.is_decoding for chunk in chunks)
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
        self._consume_media(chunks)
        logprobs = {}
        if wanted:
            logprobs = dict(zip(wanted, token_logprobs(log_probs, [tokens[row] for row in wanted],
                                                       [seqs[row].sampling.top_logprobs for row in wanted])))
        now = time.monotonic()
        self._emit([self._requests[seq.seq_id] for seq in seqs], tokens, logprobs, len(chunks))
        self._observe(chunks, len(seqs), num_decoding, now - start)
        return True

    def _consume_media(self, chunks) -> None:
        """Frees the streamed chunks prefill has read; notes when a sequence ran out of arrived chunks."""
        now = time.monotonic()
        for chunk in chunks:
            seq = chunk.seq
            if seq.mm.streamed is None or seq.num_computed_tokens > seq.num_prompt_tokens:
                continue
            seq.mm.streamed.free_consumed(seq.num_computed_tokens)
            request = self._requests.get(seq.seq_id)
            if request is not None and seq.is_waiting_for_media:
                request.media_wait_since = now

    def _drop_preempted(self) -> None:
        """Fails the streamed sequences the scheduler had to preempt: their consumed media are gone."""
        dropped = [self._requests.pop(seq.seq_id) for seq in self.scheduler.dropped]
        self.scheduler.dropped.clear()
        for request in dropped:
            self._end(request.seq, "preempted")
        self._send([(r, EngineOverloaded("llm: KV cache full, and a streamed prompt cannot be recomputed"))
                    for r in dropped])

    def _observe(self, chunks, num_generated: int, num_decoding: int, seconds: float) -> None:
        """A step that ran: its metrics, and its time for the step budget's model."""
        num_tokens = sum(c.num_new_tokens for c in chunks)
        self.step_budget.observe(num_decoding, num_tokens - num_decoding, seconds * 1e3)
        metrics.STEP_SECONDS.observe(seconds)
        metrics.STEP_TOKENS.observe(num_tokens)
        metrics.GENERATED_TOKENS.inc(num_generated)
        metrics.PREEMPTIONS.inc(self.scheduler.num_preemptions - self._preemptions_seen)
        self._preemptions_seen = self.scheduler.num_preemptions

    def _report_occupancy(self) -> None:
        metrics.RUNNING.set(len(self.scheduler.running))
        metrics.WAITING.set(len(self.scheduler.waiting))
        metrics.KV_BLOCKS_USED.set(self.block_manager.num_blocks - self.block_manager.num_free_blocks)
        metrics.MEDIA_WAITING.set(sum(seq.is_waiting_for_media for seq in self.scheduler.running))

    def _emit(self, requests: list[_Request], tokens: list[int], logprobs: dict[int, TokenLogprobs],
              batch: int) -> None:
        """Hands each request its new token (with its log-probabilities, by row, when asked): stop checks and
        detokenisation for the whole batch at once, and one wake-up of each event loop for all its events."""
        is_eos = [token in self.eos_ids for token in tokens]
        texts = [(r.detokenizer, token) for r, token, eos in zip(requests, tokens, is_eos) if not eos]
        is_stop_string = iter(add_tokens([d for d, _ in texts], [token for _, token in texts]))
        events = []
        for row, (request, token, eos) in enumerate(zip(requests, tokens, is_eos)):
            seq = request.seq
            if seq.num_output_tokens > 1:  # a token after its first (the scheduler noted when that came)
                request.batch_sum += batch
                request.decode_steps += 1
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
        self._report_occupancy()  # before any caller hears its request ended: the gauges never lag a final
        self._send(events)

    def _finish(self, request: _Request, reason: str) -> Finished:
        seq = request.seq
        metrics.FINISHED.labels(reason).inc()
        self._end(seq, reason)
        self._requests.pop(seq.seq_id, None)
        start = seq.arrival_time
        return Finished(reason, seq.num_prompt_tokens, seq.num_output_tokens,
                        queue_ms=(request.first_scheduled - start) * 1e3,
                        # Prefill's own time: not the time it waited for streamed media chunks, which would
                        # teach the router's prefill cost model that prompts take as long as their encoders.
                        prefill_ms=(seq.first_token_at - request.first_scheduled - request.media_wait_s) * 1e3,
                        ttft_ms=(seq.first_token_at - start) * 1e3,
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
            self._end(request.seq, "error")
        self._send([(request, RuntimeError("llm: model step failed")) for request in self._requests.values()])
        self._requests.clear()


def _deliver(deliveries: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, event in deliveries:
        queue.put_nowait(event)
