"""Settings of the encoder service."""

from __future__ import annotations

import dataclasses

from mmserve.config import CacheOptions, ModelOptions, ServiceConfig, option


@dataclasses.dataclass(frozen=True)
class EncoderConfig(ServiceConfig, CacheOptions, ModelOptions):
    """Encoder service: the model's vision tower only, with dynamic batching; writes the embedding cache."""

    max_batch_patches: int = option(65536, "vision patches encoded together in one step")
    nice: int = option(10, "niceness added to the process at start, 0-19: on cores it shares with the llm, "
                           "encoding gives way to the llm's decode steps, which every running request's next token "
                           "waits on (0: equal)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_model_options()
        if self.max_batch_patches < 1:
            raise ValueError("max_batch_patches: must be positive")
        self.check_cache_options()
