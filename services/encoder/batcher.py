"""Dynamic batching: what is queued when the tower frees up is encoded together, as far as the most urgent job's
slack allows; nobody waits for company."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import time
from typing import Callable

import torch

from mmserve.models.family import EncodedItem, MediaItem
from services.encoder import metrics

log = logging.getLogger(__name__)


class EncoderOverloaded(Exception):
    """The queue is full."""


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One job's result: what the tower made of it, and its share of the tower's time."""

    item: EncodedItem
    # The time of the batch it ran in, times its share of that batch's patches: its own work, not its wait in
    # the queue (the router prices the queue from its backlog; learnt into the cost model, a burst's waits
    # would be counted twice and outlive the burst).
    tower_ms: float


@dataclasses.dataclass(eq=False)
class _Job:
    pixel_values: torch.Tensor  # [num_patches, patch_dim]
    item: MediaItem
    done: asyncio.Future
    # Wall-clock seconds: the queue is served earliest due first; a unified replica orders its slices against
    # prefills by it.
    deadline: float = math.inf
    has_due: bool = False  # the deadline is the router's due time, not the arrival: a batch may not overrun it


@dataclasses.dataclass
class _WholeDevice:
    """The turn of an encoder that has its device to itself."""

    max_patches: int
    num_threads: int = 0
    num_patches: int = 0


class Batcher:
    """Queues (pixel_values, item) jobs and runs the vision tower on batches in a worker thread.

    A batch takes the earliest due job and the next ones that fit max_batch_patches, but its companions may take
    at most slack_share of that job's slack (its due time, the latest its media may start, less now), priced at
    the tower's recent time per patch: on a CPU, where a batch takes about as long as its jobs one by one, an
    image due soon is not held for the chunks of a video due seconds later (at 4 req/s, batching whatever fit put
    the images' p90 first token at 700 ms, batches of one at 443), while a GPU, where companions cost little, still
    batches. Jobs without a due time (the fcfs router sends none) batch whatever fits.
    """

    def __init__(self, tower, encode: Callable[..., list[EncodedItem]], max_batch_patches: int, max_queue: int,
                 arbiter=None, num_threads: int = 0, slack_share: float = 0.5):
        self.tower = tower
        # A unified replica's DeviceArbiter (services/unified): each batch waits for a turn between llm steps.
        self.arbiter = arbiter
        # Torch's intra-op (OpenMP) team belongs to the calling thread: the tower's thread sets its own size, so
        # an llm in the same process (which sets its own) neither shrinks nor grows it.
        self.num_threads = num_threads
        self.encode_items = encode  # the family's encode(tower, pixels, items)
        self.max_batch_patches = max_batch_patches
        self.max_queue = max_queue
        self.slack_share = slack_share
        self.ms_per_patch = 0.0  # the tower's recent time per patch (0 until it has run)
        self.device = next(tower.parameters()).device
        self.jobs: collections.deque[_Job] = collections.deque()
        self._has_jobs = asyncio.Event()
        self._worker: asyncio.Task | None = None
        # Always the same OS thread: torch's OpenMP team stays warm (a new calling thread builds a new one).
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision-tower")

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def encode(self, pixel_values: torch.Tensor, item: MediaItem, due: float | None = None) -> Encoded:
        """What the tower makes of one image or video (its embeddings [num_tokens, hidden], on the CPU). due: the
        latest time (wall clock) its encode may start, from the router; None: due when it came."""
        if len(self.jobs) >= self.max_queue:
            metrics.REFUSED.inc()
            raise EncoderOverloaded(f"encoder: {self.max_queue} requests already queued")
        job = _Job(pixel_values, item, asyncio.get_running_loop().create_future(),
                   time.time() if due is None else due, has_due=due is not None)
        self.jobs.append(job)
        self._has_jobs.set()
        metrics.REQUESTS.inc()
        metrics.QUEUED.set(len(self.jobs))
        return await job.done  # cancelling the caller cancels the future; the worker then skips the job

    async def _run(self) -> None:
        while True:
            await self._has_jobs.wait()
            self._order()
            if not self.jobs:
                self._has_jobs.clear()
                metrics.QUEUED.set(0)
                continue
            async with self._turn(self.jobs[0].pixel_values.shape[0], self.jobs[0].deadline) as turn:
                batch = self._take(min(self.max_batch_patches, turn.max_patches))
                if batch:
                    await self._run_batch(batch, turn.num_threads or self.num_threads)
                    turn.num_patches = sum(job.pixel_values.shape[0] for job in batch)

    def _turn(self, first_patches: int, deadline: float):
        """The device for one batch: the arbiter's grant on a unified replica, else all of it at once."""
        if self.arbiter is not None:
            return self.arbiter.slice(first_patches, deadline)
        return contextlib.nullcontext(_WholeDevice(self.max_batch_patches))

    def _order(self) -> None:
        """The queue without cancelled jobs, earliest due first: the router sends each encode the latest time its
        media may start and still meet its first-token deadline, so an image never waits inside the encoder
        behind the chunks of a video due seconds later. A job without a due time is due when it came, and equal
        ones keep their arrival order."""
        self.jobs = collections.deque(sorted((job for job in self.jobs if not job.done.cancelled()),
                                             key=lambda job: job.deadline))

    def _take(self, max_patches: int) -> list[_Job]:
        """The queued jobs that fit max_patches and the first one's slack, earliest due first (the first always
        goes), cancelled ones dropped."""
        self._order()  # more may have come while the turn was awaited
        if not self.jobs:
            self._has_jobs.clear()
            return []
        batch = [self.jobs.popleft()]
        patches = batch[0].pixel_values.shape[0]
        # What companions may add to the first job's time, in patches: unbounded while the tower is unmeasured.
        spare = math.inf
        if batch[0].has_due and self.ms_per_patch > 0:
            spare = self.slack_share * (batch[0].deadline - time.time()) * 1e3 / self.ms_per_patch
        while self.jobs and patches + self.jobs[0].pixel_values.shape[0] <= max_patches:
            spare -= self.jobs[0].pixel_values.shape[0]
            if spare < 0:
                break
            patches += self.jobs[0].pixel_values.shape[0]
            batch.append(self.jobs.popleft())
        if not self.jobs:
            self._has_jobs.clear()
        metrics.QUEUED.set(len(self.jobs))
        return [job for job in batch if not job.done.cancelled()]

    async def _run_batch(self, batch: list[_Job], num_threads: int) -> None:
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.PATCHES.inc(sum(job.pixel_values.shape[0] for job in batch))
        started = time.perf_counter()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self._encode, batch, num_threads)
        except Exception as err:  # a failed batch fails its requests, never the service
            log.exception("vision tower failed on a batch of %d", len(batch))
            outputs = [err] * len(batch)
        seconds = time.perf_counter() - started
        metrics.STEP_SECONDS.observe(seconds)
        num_patches = sum(job.pixel_values.shape[0] for job in batch)
        if not isinstance(outputs[0], Exception):
            ms = seconds * 1e3 / num_patches
            self.ms_per_patch = 0.8 * self.ms_per_patch + 0.2 * ms if self.ms_per_patch else ms
        for job, out in zip(batch, outputs):
            if job.done.done():
                continue
            if isinstance(out, Exception):
                job.done.set_exception(RuntimeError("encoder: vision tower failed"))
            else:
                job.done.set_result(Encoded(out, seconds * 1e3 * job.pixel_values.shape[0] / num_patches))

    @torch.inference_mode()
    def _encode(self, batch: list[_Job], num_threads: int) -> list[EncodedItem]:
        if num_threads and torch.get_num_threads() != num_threads:
            torch.set_num_threads(num_threads)
        # A unified replica on a GPU runs the tower on its low-priority stream (None: the current one).
        with torch.cuda.stream(getattr(self.arbiter, "encoder_stream", None)):
            pixel_values = torch.cat([job.pixel_values for job in batch])
            # Each item is its own attention sequence (cu_seqlens), so packing them adds no cross-talk.
            encoded = self.encode_items(self.tower, pixel_values, [job.item for job in batch])
            return [EncodedItem(e.embeddings.cpu(), tuple(d.cpu() for d in e.deepstack)) for e in encoded]
