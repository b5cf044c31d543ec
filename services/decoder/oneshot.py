"""Decodes local files with the service's own engine, outside gRPC (for `mmserve decode` and benchmarks)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from services.decoder.config import DecoderConfig
from services.decoder.engine import DecodedChunk, DecodeEngine, VideoOptions

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif"})


@dataclasses.dataclass(frozen=True)
class DecodeReport:
    """One decoded file: the frames, how they were chunked, and the time inside the decoder."""

    path: str
    kind: str
    frames: torch.Tensor
    frame_indices: list[int]
    sample_fps: float
    chunk_sizes: list[int]
    chunk_worker_ms: list[float]
    first_chunk_ms: float
    decode_ms: float

    def summary(self) -> dict:
        """JSON-ready facts (no pixels)."""
        t, h, w, _ = self.frames.shape
        return {"file": self.path, "kind": self.kind, "frames": t, "height": h, "width": w,
                "frame_indices": self.frame_indices, "sample_fps": round(self.sample_fps, 6),
                "num_chunks": len(self.chunk_sizes), "chunk_frames": self.chunk_sizes,
                "chunk_worker_ms": [round(ms, 1) for ms in self.chunk_worker_ms],
                "first_chunk_ms": round(self.first_chunk_ms, 1), "decode_ms": round(self.decode_ms, 1)}


class LocalDecoder:
    """A started engine (worker processes up) that decodes files by path; use as an async context manager."""

    def __init__(self, config: DecoderConfig):
        self.engine = DecodeEngine(config)

    async def __aenter__(self) -> LocalDecoder:
        await self.engine.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.engine.close()

    async def decode(self, path: str | Path, options: VideoOptions = VideoOptions()) -> DecodeReport:
        """Decodes one file; decode_ms runs from the call to the last chunk (workers already started)."""
        path = Path(path)
        start = time.perf_counter()
        chunks: list[DecodedChunk] = []
        first_ms = 0.0
        if path.suffix.lower() in IMAGE_SUFFIXES:
            chunks.append(await self.engine.decode_image(path, min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28))
            kind = "image"
        else:
            async for chunk in self.engine.decode_video(path, options):
                first_ms = first_ms or (time.perf_counter() - start) * 1e3
                chunks.append(chunk)
                chunk.taken()  # kept here, in full: the engine may decode the next
            kind = "video"
        decode_ms = (time.perf_counter() - start) * 1e3
        return DecodeReport(str(path), kind, torch.cat([torch.as_tensor(c.frames) for c in chunks]),
                            [i for c in chunks for i in c.frame_indices], chunks[0].sample_fps,
                            [len(c.frame_indices) for c in chunks], [c.decode_ms for c in chunks],
                            first_ms or decode_ms, decode_ms)
