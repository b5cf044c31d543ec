"""Settings of the encoder service."""

from __future__ import annotations

import dataclasses

from mmserve.config import DTYPES, CacheOptions, ServiceConfig, option


@dataclasses.dataclass(frozen=True)
class EncoderConfig(ServiceConfig, CacheOptions):
    """Encoder service: the model's vision tower only, with dynamic batching; writes the embedding cache."""

    model: str = option("", "checkpoint directory or hub id")
    dtype: str = option("auto", "vision tower dtype: auto (the checkpoint's, when the device computes it in hardware; "
                                "else float32), float32, bfloat16 or float16")
    device: str = option("auto", "cpu, cuda, cuda:N, or auto (the first GPU when one is visible)")
    max_batch_patches: int = option(65536, "vision patches encoded together in one step")
    max_queue: int = option(256, "requests waiting before new ones get RESOURCE_EXHAUSTED")
    num_threads: int = option(0, "torch intra-op threads (0 keeps torch's default)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise ValueError("model: required")
        if self.num_threads < 0:
            raise ValueError("num_threads: must not be negative")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.max_batch_patches < 1 or self.max_queue < 1:
            raise ValueError("max_batch_patches, max_queue: must be positive")
        self.check_cache_options()
