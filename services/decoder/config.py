"""Settings of the decoder service."""

from __future__ import annotations

import dataclasses
import os

from mmserve.config import ServiceConfig, option


@dataclasses.dataclass(frozen=True)
class DecoderConfig(ServiceConfig):
    """Decoder service: images and videos into sampled, resized RGB frames."""

    model: str = option("", "checkpoint directory whose family's sampling and resize rules the decoder follows "
                            "(reads only its JSON files; empty: Qwen2.5-VL's defaults)")
    media_root: str = option("", "directory file:// URIs may read from (empty disables file://)")
    max_media_bytes: int = option(200 * 1024 * 1024, "largest encoded media file accepted")
    num_workers: int = option(0, "decoder worker processes (0: one per available CPU core)")
    ffmpeg_threads: int = option(1, "FFmpeg threads per worker; workers × threads should not exceed the cores")
    chunks_per_worker: int = option(1, "chunks per worker a video is split into (more: an earlier first chunk)")
    max_chunks_ahead: int = option(0, "video chunks a request may have decoding or decoded and not yet taken by its "
                                      "consumer, which bounds its memory; a request may ask for fewer "
                                      "(0: twice the workers times chunks_per_worker)")
    min_chunk_cost: float = option(30.0, "smallest chunk worth its own worker task, in decoded packets")
    skip_nonref: bool = option(True, "skip decoding H.264/HEVC frames that nothing references and nobody wants")
    task_timeout_s: float = option(60.0, "a worker task running longer than this (plus the allowance) is killed")
    task_ms_per_packet: float = option(50.0, "time allowance per packet a chunk decodes, on top of task_timeout_s")
    max_video_seconds: float = option(2 * 3600.0, "longest video accepted, from its headers")
    max_video_frames: int = option(2 * 3600 * 60, "most frames a video may have")
    max_queue: int = option(256, "requests decoding or waiting for a worker before new ones get RESOURCE_EXHAUSTED")
    scratch_dir: str = option("", "where request files for the workers go (empty: /dev/shm when present)")
    device: str = option("auto", "video decoding: auto (NVDEC on every visible GPU when PyNvVideoCodec is "
                                 "installed, else the CPU workers), cpu, or cuda (refuse to start without NVDEC)")
    nvdec_sessions_per_gpu: int = option(4, "video chunks one GPU decodes at once (NVDEC sessions)")
    nvdec_gpus: int = option(0, "GPUs the chunks of a video fan out over (0: every visible one)")
    nice: int = option(10, "niceness added to the process at start, 0-19: on cores it shares with the llm, "
                           "decoding gives way to the llm's decode steps, which every running request's next token "
                           "waits on (0: equal)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.max_media_bytes, self.ffmpeg_threads, self.chunks_per_worker, self.max_video_frames,
               self.max_queue) < 1:
            raise ValueError("max_media_bytes, ffmpeg_threads, chunks_per_worker, max_video_frames, max_queue: "
                             "must be positive")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError("device: must be auto, cpu or cuda")
        if self.nvdec_sessions_per_gpu < 1 or self.nvdec_gpus < 0:
            raise ValueError("nvdec_sessions_per_gpu: must be positive; nvdec_gpus: not negative")
        if self.num_workers < 0 or self.max_chunks_ahead < 0:
            raise ValueError("num_workers, max_chunks_ahead: must be 0 (the default) or positive")
        if min(self.task_timeout_s, self.max_video_seconds) <= 0 or min(self.min_chunk_cost,
                                                                         self.task_ms_per_packet) < 0:
            raise ValueError("task_timeout_s, max_video_seconds: must be positive; "
                             "min_chunk_cost, task_ms_per_packet: not negative")

    @property
    def effective_workers(self) -> int:
        """Worker processes to run."""
        return self.num_workers or max(1, len(os.sched_getaffinity(0)) // self.ffmpeg_threads)
