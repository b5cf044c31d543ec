"""The decoder picks NVDEC or its CPU workers by capability and config, and fans a video's chunks over the GPUs."""

from __future__ import annotations

import pytest

from mmserve.media import nvdec
from services.decoder import engine
from services.decoder.config import DecoderConfig
from services.decoder.engine import _gpu_decoders


def test_cpu_workers_without_nvdec_or_when_asked(monkeypatch):
    monkeypatch.setattr(nvdec, "is_available", lambda: False)
    assert _gpu_decoders(DecoderConfig()) is None
    assert _gpu_decoders(DecoderConfig(device="cpu")) is None
    with pytest.raises(RuntimeError, match="PyNvVideoCodec"):
        _gpu_decoders(DecoderConfig(device="cuda"))


def test_nvdec_on_every_visible_gpu_or_the_configured_number(monkeypatch):
    monkeypatch.setattr(engine, "nvdec_installed", lambda: True)
    monkeypatch.setattr(nvdec, "is_available", lambda: True)
    monkeypatch.setattr(nvdec, "num_gpus", lambda: 4)
    assert _gpu_decoders(DecoderConfig(device="cpu")) is None
    assert _gpu_decoders(DecoderConfig()).num_devices == 4
    assert _gpu_decoders(DecoderConfig(device="cuda", nvdec_gpus=2)).num_devices == 2
    assert _gpu_decoders(DecoderConfig(device="cuda", nvdec_gpus=9)).num_devices == 4


def test_chunks_go_round_robin_over_the_gpus():
    gpus = nvdec.GpuDecoders(3, sessions_per_gpu=2)
    assert [gpus.device_for(i) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_bad_device_settings_are_refused():
    with pytest.raises(ValueError, match="device"):
        DecoderConfig(device="tpu")
    with pytest.raises(ValueError, match="nvdec_sessions_per_gpu"):
        DecoderConfig(nvdec_sessions_per_gpu=0)
