"""A decoder worker process: untrusted media is only ever parsed here, so a crash or hang costs one worker."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from multiprocessing.connection import Connection

import numpy as np

from mmserve.cache_keys import MediaParams
from mmserve.media.chunked import decode_chunk
from mmserve.media.image import decode_image_with
from mmserve.media.errors import MediaError
from mmserve.media.video import decode_video, index_video
from services.decoder.tasks import ChunkTask, ImageTask, IndexTask, SequentialTask, WorkerSettings


def _output(task) -> np.memmap:
    return np.memmap(task.out_path, dtype=np.uint8, mode="r+", shape=task.out_shape)


def run_task(task, settings: WorkerSettings):
    """Runs one task in this process; MediaError for bad media."""
    if settings.allow_fault_injection and getattr(task, "fault", ""):
        _inject(task.fault)
    if isinstance(task, IndexTask):
        return index_video(task.source, max_frames=task.max_frames, max_seconds=task.max_seconds)
    if isinstance(task, ChunkTask):
        out = _output(task)
        decode_chunk(task.source, task.spans, task.frame_pts, out[task.first:task.first + len(task.frame_pts)],
                     width=task.width, height=task.height, threads=settings.ffmpeg_threads,
                     skip_nonref=settings.skip_nonref)
        out.flush()
        return None
    if isinstance(task, SequentialTask):
        video = decode_video(task.source, threads=settings.ffmpeg_threads, indices=task.frame_indices,
                             size=task.out_shape[1:3])
        out = _output(task)
        out[:] = video.frames
        out.flush()
        return None
    if isinstance(task, ImageTask):
        family, params = settings.family, MediaParams("image", min_pixels=task.min_pixels, max_pixels=task.max_pixels)
        grid = []

        def frames_of(image):
            plan = family.plan_decode("image", params, image.height, image.width)
            grid.extend(plan.item.grid)
            return family.image_frames(image, plan)

        with open(task.source, "rb") as f:
            frames = decode_image_with(f.read(), frames_of)
        frames.tofile(task.out_path)
        return tuple(frames.shape), tuple(grid)
    raise TypeError(f"unknown task {type(task).__name__}")


def _inject(fault: str) -> None:
    """Test-only faults, enabled by MMSERVE_DECODER_FAULT_INJECTION=1 in the service environment."""
    if fault == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if fault == "hang":
        threading.Event().wait()


def _keep_freed_memory() -> None:
    """Ask glibc to reuse freed frame-sized buffers instead of unmapping them: each frame's float buffers
    (tens of MB) would otherwise be page-faulted in afresh, which is slow and scales badly across workers."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: the largest glibc allows
    libc.mallopt(-1, 256 * 1024 * 1024)  # M_TRIM_THRESHOLD


def worker_main(conn: Connection, settings: WorkerSettings) -> None:
    """Serves tasks from conn until it closes: acknowledges each, then replies ("ok", result, ms),
    ("invalid", msg) or ("error", msg)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    _keep_freed_memory()
    while True:
        try:
            task = conn.recv()
            conn.send(("started",))
        except (EOFError, OSError):
            return
        start = time.perf_counter()
        try:
            reply = ("ok", run_task(task, settings), (time.perf_counter() - start) * 1e3)
        except MediaError as err:
            reply = ("invalid", str(err))
        except Exception as err:  # a bug or resource failure, reported as INTERNAL by the server
            reply = ("error", f"{type(err).__name__}: {err}")
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return
