"""NVDEC video decoding with PyNvVideoCodec: a chunk's target frames decoded, colour-converted and resized on a GPU.

Chosen by capability (`is_available`): a visible CUDA device and the PyNvVideoCodec package (the `gpu` extra).
The decoder service plans chunks exactly as for its CPU workers and hands each chunk to one GPU; frames come
back as uint8 [T,H,W,3] tensors on that GPU, resized by the same bicubic rule as the CPU path.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import threading
from collections.abc import Sequence

import torch

from mmserve.media.preprocess import MediaError, resize_frames

# Frames fetched per get_batch_frames_by_index call: bounds the decoder's native surfaces held at once.
_BATCH = 32


class NvdecUnsupported(RuntimeError):
    """This GPU cannot decode the stream (codec, chroma format, bit depth or size): use the CPU path instead."""


@functools.cache
def is_available() -> bool:
    """Whether NVDEC decoding can run here: a CUDA device and PyNvVideoCodec installed."""
    return torch.cuda.is_available() and importlib.util.find_spec("PyNvVideoCodec") is not None


def num_gpus() -> int:
    """GPUs the decoder fans chunks over (every visible one)."""
    return torch.cuda.device_count() if is_available() else 0


def _nvc():
    import PyNvVideoCodec  # noqa: PLC0415 - optional GPU dependency, imported only where it runs

    return PyNvVideoCodec


def check_supported(path: str, gpu: int) -> None:
    """Raises NvdecUnsupported unless the GPU's decoder takes this stream's codec, format and size."""
    nvc = _nvc()
    try:
        demuxer = nvc.CreateDemuxer(path)
        width, height = demuxer.Width(), demuxer.Height()
        caps = nvc.GetDecoderCaps(gpu, demuxer.GetNvCodecId(), demuxer.ChromaFormat(), demuxer.BitDepth())
    except Exception as err:  # PyNvVideoCodec raises its own exception types for streams it cannot parse
        raise NvdecUnsupported(f"nvdec cannot open the stream: {err}") from None
    macroblocks = ((width + 15) // 16) * ((height + 15) // 16)
    if (not caps.get("supported") or not caps["width_min"] <= width <= caps["width_max"]
            or not caps["height_min"] <= height <= caps["height_max"] or macroblocks > caps["mb_num_max"]):
        raise NvdecUnsupported(f"nvdec on GPU {gpu} does not decode this stream ({width}x{height})")


class GpuDecoders:
    """One decoding stream per GPU; at most `sessions_per_gpu` chunks decode on a GPU at once."""

    def __init__(self, num_devices: int, sessions_per_gpu: int):
        self.num_devices = num_devices
        self._slots = [threading.Semaphore(sessions_per_gpu) for _ in range(num_devices)]

    def device_for(self, chunk_index: int) -> int:
        """Chunks go round-robin over the GPUs, so one video's chunks decode on all of them at once."""
        return chunk_index % self.num_devices

    def decode(self, path: str, frame_indices: Sequence[int], out_hw: tuple[int, int], gpu: int) -> torch.Tensor:
        """Frames at frame_indices (display order), resized to out_hw, as uint8 [T,H,W,3] on cuda:gpu (blocking)."""
        nvc = _nvc()
        with self._slots[gpu], torch.cuda.device(gpu):
            stream = torch.cuda.Stream(gpu)
            decoder = nvc.SimpleDecoder(path, gpu_id=gpu, cuda_stream=stream.cuda_stream, use_device_memory=True,
                                        output_color_type=nvc.OutputColorType.RGB)
            try:
                parts = []
                with torch.cuda.stream(stream):
                    for start in range(0, len(frame_indices), _BATCH):
                        wanted = list(frame_indices[start:start + _BATCH])
                        try:
                            frames = decoder.get_batch_frames_by_index(wanted)
                        except IndexError:
                            raise MediaError(f"video: frames {wanted[0]}..{wanted[-1]} are past its end") from None
                        # stack copies the frames out of the decoder's surfaces before the next call reuses them.
                        batch = torch.stack([torch.from_dlpack(f) for f in frames])
                        if batch.shape[-1] != 3:  # planar RGB: [T,3,H,W] -> [T,H,W,3]
                            batch = batch.permute(0, 2, 3, 1)
                        parts.append(resize_frames(batch.contiguous(), *out_hw))
                stream.synchronize()
                return torch.cat(parts)
            finally:
                with contextlib.suppress(Exception):
                    decoder.stop()
