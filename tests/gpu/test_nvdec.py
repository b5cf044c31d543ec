"""NVDEC chunked decoding gives the CPU path's frames, at the same indices, on one GPU and on all (needs a GPU)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from mmserve.media import nvdec
from mmserve.media.samples import make_video
from services.decoder.config import DecoderConfig
from services.decoder.engine import DecodeEngine, VideoOptions

pytestmark = pytest.mark.gpu

CLIPS = {
    "h264-open-gop-bframes": dict(codec="h264", gop=30,
                                  encoder_options={"x264-params": "bframes=3:b-adapt=0:open-gop=1"}),
    "h264-gop250": dict(codec="h264", gop=250),
    "hevc": dict(codec="hevc", gop=30),
}


async def _decode(config: DecoderConfig, data: bytes) -> tuple[torch.Tensor, list[int], int]:
    engine = DecodeEngine(config)
    await engine.start()
    try:
        chunks = [c async for c in engine.decode_video(data, VideoOptions(fps=2.0))]
    finally:
        await engine.close()
    frames = torch.cat([torch.as_tensor(c.frames) for c in chunks])
    return frames, [i for c in chunks for i in c.frame_indices], len(chunks)


@pytest.fixture(scope="module", params=sorted(CLIPS))
def clip(request) -> bytes:
    return make_video(seconds=12.0, fps=30, width=640, height=360, **CLIPS[request.param])


def test_nvdec_is_selected_by_capability():
    assert nvdec.is_available()
    assert nvdec.num_gpus() == torch.cuda.device_count()


@pytest.mark.parametrize("num_gpus", [1, 0], ids=["one-gpu", "all-gpus"])
def test_gpu_frames_equal_cpu_frames_at_the_same_indices(clip, num_gpus):
    cpu, cpu_indices, _ = asyncio.run(_decode(DecoderConfig(device="cpu", num_workers=2), clip))
    gpu, gpu_indices, num_chunks = asyncio.run(_decode(
        DecoderConfig(device="cuda", nvdec_gpus=num_gpus, nvdec_sessions_per_gpu=2), clip))
    assert num_chunks > 1  # chunked, not one sequential pass
    assert gpu_indices == cpu_indices
    assert gpu.shape == cpu.shape and gpu.dtype == torch.uint8
    # NVDEC's YUV->RGB differs from FFmpeg's by rounding only; a shifted frame would differ by far more.
    distances = torch.cdist(gpu.flatten(1).float(), cpu.flatten(1).float())
    assert distances.argmin(dim=1).tolist() == list(range(len(cpu_indices)))
    assert (gpu.float() - cpu.float()).abs().mean() < 4.0
