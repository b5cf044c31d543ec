"""Settings of the router service."""

from __future__ import annotations

import dataclasses

from mmserve.config import CacheOptions, ServiceConfig, option


@dataclasses.dataclass(frozen=True)
class RouterConfig(ServiceConfig, CacheOptions):
    """Router service: the public API; validates, consults the cache, orchestrates decode → encode → llm."""

    model: str = option("", "checkpoint directory or hub id (preprocessing defaults, cache keys)")
    decoder_addrs: str = option("", "comma-separated decoder replica addresses")
    encoder_addrs: str = option("", "comma-separated encoder replica addresses")
    llm_addrs: str = option("", "comma-separated llm replica addresses")
    media_root: str = option("", "directory file:// URIs may read from (empty disables file://)")
    max_media_bytes: int = option(200 * 1024 * 1024, "largest encoded media file accepted")
    max_media_per_request: int = option(16, "images plus videos in one request")
    max_messages: int = option(256, "messages in one request")
    max_tokens_limit: int = option(8192, "largest max_tokens a request may ask for")
    request_timeout_s: float = option(600.0, "deadline for a request without one of its own")
    http_port: int = option(0, "OpenAI-compatible HTTP port (0 disables)")
    served_model_name: str = option("", "model name reported by the HTTP API (default: the model directory name)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise ValueError("model: required")
        for name in ("max_media_bytes", "max_media_per_request", "max_messages", "max_tokens_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s: must be positive")
        if not 0 <= self.http_port < 65536:
            raise ValueError("http_port: must be in 0..65535")
        self.check_cache_options()
        for name in ("decoder_addrs", "encoder_addrs", "llm_addrs"):
            if not getattr(self, name):
                raise ValueError(f"{name}: at least one address is required")

    @staticmethod
    def split(addresses: str) -> list[str]:
        """A comma-separated address list as a list."""
        return [a.strip() for a in addresses.split(",") if a.strip()]
