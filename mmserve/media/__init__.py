"""Media decoding and Qwen2.5-VL preprocessing for images and videos."""

from mmserve.media.errors import MediaError

__all__ = ["MediaError"]
