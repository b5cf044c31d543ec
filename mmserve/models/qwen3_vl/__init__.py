"""Qwen3-VL: 16-pixel patches, DeepStack, interleaved M-RoPE, timestamped video groups."""

from mmserve.models.qwen3_vl.family import Qwen3VL, from_pretrained  # noqa: F401
