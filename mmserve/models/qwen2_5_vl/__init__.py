"""Qwen2.5-VL behind the family interface, wrapping today's code (media sizing/preprocess, models/loading.py)."""

from mmserve.models.qwen2_5_vl.family import Qwen25VL, from_defaults, from_pretrained  # noqa: F401
