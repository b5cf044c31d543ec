"""What the decoder's front end asks of its worker processes: the tasks and the workers' settings (no torch, no
PyAV here: the front end only hands these on; the workers, forked from a server that preloads both, run them)."""

from __future__ import annotations

import dataclasses
from multiprocessing.connection import Connection
from typing import Any

from mmserve.media.plan import Span


@dataclasses.dataclass(frozen=True)
class IndexTask:
    """Probe a video and read its packet index."""

    source: str
    max_frames: int
    max_seconds: float


@dataclasses.dataclass(frozen=True)
class ChunkTask:
    """Decode frames out[first:first + len(frame_pts)] of the [T,H,W,3] uint8 file at out_path."""

    source: str
    out_path: str
    out_shape: tuple[int, int, int, int]
    first: int
    spans: tuple[Span, ...]
    frame_pts: tuple[int, ...]
    width: int
    height: int
    fault: str = ""


@dataclasses.dataclass(frozen=True)
class SequentialTask:
    """Decode the whole video front to back (streams whose index cannot be planned), keeping frame_indices."""

    source: str
    out_path: str
    out_shape: tuple[int, int, int, int]
    frame_indices: list[int]
    fault: str = ""


@dataclasses.dataclass(frozen=True)
class ImageTask:
    """Decode an image into a new [T,H,W,3] uint8 file at out_path (the family's frames of it); the reply is their
    shape and the item's grid."""

    source: str
    out_path: str
    min_pixels: int
    max_pixels: int
    fault: str = ""


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    """How each worker decodes."""

    ffmpeg_threads: int = 1
    skip_nonref: bool = True
    allow_fault_injection: bool = False
    family: Any = None  # the model family whose resize rules (and InternVL tiling) images follow


def run_worker(conn: Connection, settings: WorkerSettings) -> None:
    """A worker process's entry point: serves tasks from conn (services.decoder.worker, loaded in the worker)."""
    from services.decoder.worker import worker_main

    worker_main(conn, settings)
