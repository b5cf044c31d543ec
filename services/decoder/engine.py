"""Decodes one request end to end: index in a worker, plan, fan chunks out to the pool, yield them in order."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmserve.cache_keys import MediaParams
from mmserve.media import sizing as pp
from mmserve.media.errors import MediaError
from mmserve.media.plan import (Chunk, CostModel, PlanError, VideoIndex, plan_chunks, select_chunks, window_ranges,
                                workers_for_request)
from mmserve.models.family import DecodePlan, Family, planning_family
from services.decoder.ahead import decode_ahead
from services.decoder.config import DecoderConfig
from services.decoder.pool import WorkerError, WorkerPool
from services.decoder.tasks import ChunkTask, ImageTask, IndexTask, SequentialTask, WorkerSettings

if TYPE_CHECKING:
    import torch

    from mmserve.media import nvdec

log = logging.getLogger(__name__)

FAULT_INJECTION_ENV = "MMSERVE_DECODER_FAULT_INJECTION"


@dataclasses.dataclass(frozen=True)
class VideoOptions:
    """Sampling and sizing of one video (defaults: qwen-vl-utils fetch_video's; the family reads what it uses)."""

    fps: float = pp.FPS
    min_frames: int = pp.FPS_MIN_FRAMES
    max_frames: int = pp.FPS_MAX_FRAMES
    min_pixels: float = pp.VIDEO_MIN_PIXELS
    max_pixels: float = pp.VIDEO_MAX_PIXELS
    total_pixels: float = pp.VIDEO_TOTAL_PIXELS

    def params(self) -> MediaParams:
        """The options as the family's planning takes them."""
        return MediaParams("video", fps=self.fps, min_frames=self.min_frames, max_frames=self.max_frames,
                           min_pixels=int(self.min_pixels), max_pixels=int(self.max_pixels),
                           total_pixels=int(self.total_pixels))


@dataclasses.dataclass(frozen=True)
class DecodedChunk:
    """Frames out[first:first + T] of a request, uint8 [T,H,W,3], with their source frame indices: a numpy array
    from the CPU workers (this process never loads torch for them), a torch tensor from NVDEC."""

    index: int
    num_chunks: int
    frames: np.ndarray | torch.Tensor
    frame_indices: list[int]
    sample_fps: float
    decode_ms: float  # time inside the worker
    video_fps: float = 0.0  # of the clip the frame indices count in (videos)
    grid: tuple[int, ...] = ()  # an image's grid as the family planned it (InternVL: tiles, columns, rows)
    # Call once the consumer has taken the frames: the request may then decode one more chunk ahead.
    taken: Callable[[], None] = lambda: None


@dataclasses.dataclass(frozen=True)
class VideoPlan:
    """What to decode: sampled indices, output shape, each chunk's output range, and the chunks' decode spans
    (None: one sequential pass, sliced into the ranges afterwards)."""

    indices: list[int]
    sample_fps: float
    out_shape: tuple[int, int, int, int]
    ranges: list[tuple[int, int]]
    chunks: list[Chunk] | None
    video_fps: float = 0.0


def plan_video(index: VideoIndex, options: VideoOptions, num_chunks: int, costs: CostModel,
               family: Family, chunk_frames: int = 0) -> VideoPlan:
    """Sampled frames and chunks for a video, with the family's sampling and resize rules; chunks are cut only
    where the family's embeddings may be cut: fixed windows of chunk_frames sampled frames when it is > 0 (the
    same whatever the workers), else at most num_chunks balanced by cost."""
    info = index.info
    try:
        plan = family.plan_decode("video", options.params(), info.height, info.width, info.total_frames, info.fps)
    except ValueError as err:  # the family's rules refuse this clip (too few frames, odd shape): bad media
        raise MediaError(str(err)) from None
    indices = list(plan.frame_indices)
    sample_fps = len(indices) / max(info.total_frames, 1e-6) * info.fps
    step = frames_per_cut(family, plan)
    try:
        ranges = window_ranges(len(indices), chunk_frames, step) if chunk_frames else [(0, len(indices))]
    except ValueError as err:
        raise MediaError(str(err)) from None
    chunks = None
    # Frame i is the i-th packet by pts only when every packet is shown once and the counts agree.
    if not index.has_discarded and len(index.pts) == info.total_frames:
        with contextlib.suppress(PlanError):
            chunks = plan_chunks(index.pts, index.is_key, indices, num_chunks, costs, step, chunk_frames)
            ranges = [(c.first, c.first + len(c.frame_indices)) for c in chunks]
    return VideoPlan(indices, sample_fps, (len(indices), plan.height, plan.width, 3), ranges, chunks, info.fps)


def frames_per_cut(family: Family, plan: DecodePlan) -> int:
    """Frames between two places the family's chunk_boundaries allow a cut (its temporal group)."""
    return -(-plan.num_frames // (len(family.chunk_boundaries(plan.item)) + 1))


def fault_injection_enabled() -> bool:
    """Tests only: with MMSERVE_DECODER_FAULT_INJECTION=1, request ids 'fault:crash' / 'fault:hang' break a worker
    (of the first chunk; 'fault:hang:k': of the k-th chunk asked for)."""
    return os.environ.get(FAULT_INJECTION_ENV) == "1"


class ScratchFull(RuntimeError):
    """No room in the scratch directory for this request's media or frames (overload, not bad media)."""


class DecoderOverloaded(ScratchFull):
    """max_queue requests are already decoding or waiting for a worker (RESOURCE_EXHAUSTED, like ScratchFull)."""


class DecodeEngine:
    """The decoder's worker pool and the per-request flow around it."""

    def __init__(self, config: DecoderConfig):
        self.config = config
        self.family = planning_family(config.model)
        settings = WorkerSettings(config.ffmpeg_threads, config.skip_nonref, fault_injection_enabled(), self.family)
        self.pool = WorkerPool(config.effective_workers, settings, config.task_timeout_s)
        self.costs = CostModel(min_chunk=config.min_chunk_cost)
        self.scratch_dir = config.scratch_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.num_active = 0  # requests in the decoder, waiting or running: the measured queue
        self.gpus = _gpu_decoders(config)

    async def start(self) -> None:
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.close()

    @contextlib.asynccontextmanager
    async def _admitted(self, source: bytes | Path, kind: str):
        """Counts the request as active and gives it a scratch directory and a path to its media."""
        if isinstance(source, bytes) and not source:
            raise MediaError(f"{kind}: empty data")
        if self.num_active >= self.config.max_queue:  # each holds its media, and frames, in scratch space
            raise DecoderOverloaded(f"over capacity: {self.num_active} requests already in the decoder queue")
        self.num_active += 1
        workdir = ""
        try:
            # In the try and not in a thread: a cancellation between the count and the try leaked the count, and a
            # queue that only fills ends up refusing everything. A directory is made in microseconds.
            workdir = tempfile.mkdtemp(prefix="mmserve-decode-", dir=self.scratch_dir)
            path = str(source)
            if isinstance(source, bytes):
                path = os.path.join(workdir, "media")
                await _scratch_write(Path(path).write_bytes, source)
            yield workdir, path
        finally:
            self.num_active -= 1
            if workdir:  # unlinking is quick, and workers still writing keep their own mappings alive
                shutil.rmtree(workdir, ignore_errors=True)

    async def decode_image(self, source: bytes | Path, *, min_pixels: float, max_pixels: float,
                           fault: str = "") -> DecodedChunk:
        """One image as one chunk: a single resized frame, or the family's tiles."""
        async with self._admitted(source, "image") as (workdir, path):
            out_path = os.path.join(workdir, "frames")
            (shape, grid), ms = await self.pool.run(ImageTask(path, out_path, min_pixels, max_pixels, fault))
            frames = await asyncio.to_thread(lambda: np.fromfile(out_path, dtype=np.uint8).reshape(shape))
        return DecodedChunk(0, 1, frames, [0], 0.0, ms, grid=grid)

    async def decode_video(self, source: bytes | Path, options: VideoOptions = VideoOptions(), *,
                           chunk_frames: int = 0, chunk_indices: Sequence[int] = (), max_chunks_ahead: int = 0,
                           fault: str = "") -> AsyncIterator[DecodedChunk]:
        """Chunks of a video's sampled frames, in order, each yielded as soon as it and those before it are done:
        fixed windows of chunk_frames frames when > 0; only chunk_indices when given (their index and num_chunks
        still those of the whole plan). At most max_chunks_ahead chunks (0, or above the decoder's cap: the cap)
        are decoding or decoded and not yet taken (DecodedChunk.taken)."""
        async with self._admitted(source, "video") as (workdir, path):
            c = self.config
            # The container is indexed (and so first parsed) in a worker process on either path.
            index, _ = await self.pool.run(IndexTask(path, c.max_video_frames, c.max_video_seconds))
            on_gpus = not fault and await self._nvdec_takes(path)
            num_decoders = self.gpus.num_devices * c.nvdec_sessions_per_gpu if on_gpus else self.pool.num_workers
            workers = workers_for_request(num_decoders, self.num_active)
            plan = await asyncio.to_thread(plan_video, index, options, workers * c.chunks_per_worker, self.costs,
                                           self.family, chunk_frames)
            try:
                wanted = select_chunks(len(plan.ranges), chunk_indices)
            except ValueError as err:
                raise MediaError(str(err)) from None
            cap = c.max_chunks_ahead or 2 * num_decoders * c.chunks_per_worker
            cap = min(max_chunks_ahead or cap, cap)
            if plan.chunks is None:
                chunks = self._decode_sequentially(plan, index, path, workdir, wanted, fault)
            elif on_gpus:
                chunks = self._decode_on_gpus(path, plan, wanted, cap)
            else:
                chunks = self._decode_chunks(plan, index, path, workdir, wanted, cap, fault)
            async with contextlib.aclosing(chunks) as it:
                async for chunk in it:
                    yield chunk

    async def _decode_chunks(self, plan: VideoPlan, index: VideoIndex, path: str, workdir: str, wanted: list[int],
                             cap: int, fault: str) -> AsyncIterator[DecodedChunk]:
        """The wanted chunks on the worker pool, each into its own scratch file, freed once yielded."""
        c, info = self.config, index.info

        fault_name, _, at = fault.partition(":")
        faulty = wanted[min(int(at or 0), len(wanted) - 1)]

        async def decode(chunk: Chunk) -> tuple[np.ndarray, float]:
            out_path = os.path.join(workdir, f"frames-{chunk.index}")
            shape = (len(chunk.frame_pts), *plan.out_shape[1:])
            out = await _scratch_write(_allocate, out_path, shape)
            # A test fault breaks one chunk's worker only ("hang:k": the k-th wanted, else the first), so what the
            # test sees does not race with the others.
            task = ChunkTask(path, out_path, shape, 0, chunk.spans, chunk.frame_pts, info.width, info.height,
                             fault_name if chunk.index == faulty else "")
            # Long chunks get a proportional time allowance; only a hung worker runs past it.
            num_packets = sum(s.stop - s.start for s in chunk.spans)
            _, ms = await self.pool.run(task, c.task_timeout_s + c.task_ms_per_packet * num_packets / 1e3)
            return out, ms

        async with contextlib.aclosing(decode_ahead([plan.chunks[i] for i in wanted], decode, cap)) as decoded:
            async for chunk, (frames, ms), taken in decoded:
                yield DecodedChunk(chunk.index, len(plan.chunks), frames, list(chunk.frame_indices),
                                   plan.sample_fps, ms, plan.video_fps, taken=taken)
                del frames  # the mapping goes with the file: a request holds only the chunks not yet taken
                os.unlink(os.path.join(workdir, f"frames-{chunk.index}"))

    async def _decode_sequentially(self, plan: VideoPlan, index: VideoIndex, path: str, workdir: str,
                                   wanted: list[int], fault: str) -> AsyncIterator[DecodedChunk]:
        """A stream whose index cannot be planned: one pass over the whole clip, then the wanted chunks' slices
        (its memory is the clip's, not bounded by chunks)."""
        c = self.config
        out_path = os.path.join(workdir, "frames")
        out = await _scratch_write(_allocate, out_path, plan.out_shape)
        task = SequentialTask(path, out_path, plan.out_shape, plan.indices, fault)
        _, ms = await self.pool.run(task, c.task_timeout_s + c.task_ms_per_packet * len(index.pts) / 1e3)
        for i in wanted:
            a, b = plan.ranges[i]
            yield DecodedChunk(i, len(plan.ranges), out[a:b], plan.indices[a:b], plan.sample_fps,
                               ms, plan.video_fps)

    async def _nvdec_takes(self, path: str) -> bool:
        """Whether this video goes to the GPUs: NVDEC is in use and the first GPU decodes its stream."""
        if self.gpus is None:
            return False
        from mmserve.media import nvdec

        try:
            await asyncio.to_thread(nvdec.check_supported, path, 0)
        except nvdec.NvdecUnsupported as err:
            log.info("decoding on the CPU workers: %s", err)
            return False
        return True

    async def _decode_on_gpus(self, path: str, plan: VideoPlan, wanted: list[int],
                              cap: int) -> AsyncIterator[DecodedChunk]:
        """The wanted chunks spread over the GPUs, at most cap ahead of those taken, yielded in order."""
        out_hw = plan.out_shape[1:3]

        def decode(chunk: Chunk) -> tuple[torch.Tensor, float]:
            start = time.perf_counter()
            try:
                frames = self.gpus.decode(path, chunk.frame_indices, out_hw, self.gpus.device_for(chunk.index))
            except MediaError:
                raise
            except Exception as err:  # PyNvVideoCodec's own exception types: a failure, not bad input
                raise WorkerError(f"nvdec: {err}") from err
            # The tensor transport carries host memory: the frames leave the GPU here, resized (small).
            return frames.cpu(), (time.perf_counter() - start) * 1e3

        chunks = [plan.chunks[i] for i in wanted]
        async with contextlib.aclosing(decode_ahead(chunks, lambda c: asyncio.to_thread(decode, c), cap)) as decoded:
            async for chunk, (frames, ms), taken in decoded:
                yield DecodedChunk(chunk.index, len(plan.chunks), frames, list(chunk.frame_indices),
                                   plan.sample_fps, ms, plan.video_fps, taken=taken)


def nvdec_installed() -> bool:
    """Whether PyNvVideoCodec is installed (told without loading it, or torch)."""
    return importlib.util.find_spec("PyNvVideoCodec") is not None


def _gpu_decoders(config: DecoderConfig) -> nvdec.GpuDecoders | None:
    """NVDEC over every visible GPU when the config and the machine allow it, else None (CPU workers). Without
    PyNvVideoCodec, auto loads no torch here."""
    if config.device == "cpu" or (config.device == "auto" and not nvdec_installed()):
        return None
    from mmserve.media import nvdec  # torch, for the frames on the GPU

    if config.device == "auto" and not nvdec.is_available():
        return None
    if not nvdec.is_available():
        raise RuntimeError("device cuda: no CUDA device or PyNvVideoCodec is not installed (pip install '.[gpu]')")
    num_devices = min(config.nvdec_gpus or nvdec.num_gpus(), nvdec.num_gpus())
    return nvdec.GpuDecoders(num_devices, config.nvdec_sessions_per_gpu)


async def _scratch_write(fn, *args):
    """Runs a scratch-file write in a thread; a full disk becomes ScratchFull."""
    try:
        return await asyncio.to_thread(fn, *args)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ScratchFull(f"decoder scratch space is full ({err.strerror}); try again later") from None
        raise


def _allocate(path: str, shape: tuple[int, ...]) -> np.memmap:
    """A zeroed file-backed frame buffer the workers write into and the server reads from."""
    with open(path, "wb") as f:
        # Reserve the space now: a sparse file on a full tmpfs would kill the worker with SIGBUS later.
        os.posix_fallocate(f.fileno(), 0, int(np.prod(shape)))
    return np.memmap(path, dtype=np.uint8, mode="r+", shape=shape)
