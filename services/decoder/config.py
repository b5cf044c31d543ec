"""Settings of the decoder service."""

from __future__ import annotations

import dataclasses

from mmserve.config import ServiceConfig, option


@dataclasses.dataclass(frozen=True)
class DecoderConfig(ServiceConfig):
    """Decoder service: images and videos into sampled, resized RGB frames."""

    media_root: str = option("", "directory file:// URIs may read from (empty disables file://)")
    max_media_bytes: int = option(200 * 1024 * 1024, "largest encoded media file accepted")
    ffmpeg_threads: int = option(2, "FFmpeg decode threads per video")
    max_concurrent_decodes: int = option(2, "videos decoded at once; others wait their turn")

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.max_media_bytes, self.ffmpeg_threads, self.max_concurrent_decodes) < 1:
            raise ValueError("max_media_bytes, ffmpeg_threads, max_concurrent_decodes: must be positive")
