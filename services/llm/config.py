"""Settings of the LLM service."""

from __future__ import annotations

import dataclasses

from mmserve.config import DTYPES, CacheOptions, ServiceConfig, option


@dataclasses.dataclass(frozen=True)
class LlmConfig(ServiceConfig, CacheOptions):
    """LLM service: the language model with continuous batching over a paged KV cache; reads cached embeddings."""

    model: str = option("", "checkpoint directory or hub id")
    dtype: str = option("auto", "weight and KV dtype: auto (the checkpoint's, when the device computes it in hardware; "
                                "else float32), float32, bfloat16 or float16")
    device: str = option("auto", "cpu, cuda, cuda:N, or auto (the first GPU when one is visible)")
    max_num_seqs: int = option(64, "sequences running at once")
    max_num_batched_tokens: int = option(2048, "tokens computed per engine step (chunked prefill budget)")
    block_size: int = option(0, "tokens per KV block (0: 256 where flash-attn's paged kernels run, as they need a "
                                "multiple of 256; else 16)")
    cuda_graphs: bool = option(True, "replay decode steps from CUDA graphs captured at start (GPU with flash-attn)")
    kv_cache_bytes: int = option(512 * 1024 * 1024, "memory for the KV cache")
    max_model_len: int = option(32768, "longest prompt plus output, in tokens")
    max_queue: int = option(1024, "requests waiting before new ones get RESOURCE_EXHAUSTED")
    num_threads: int = option(0, "torch intra-op threads (0 keeps torch's default)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise ValueError("model: required")
        if self.num_threads < 0:
            raise ValueError("num_threads: must not be negative")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.max_queue) < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens, max_queue: must be positive")
        if self.block_size < 0:
            raise ValueError("block_size: must not be negative")
        if self.max_model_len < 2:
            raise ValueError("max_model_len: must be at least 2")
        if self.kv_cache_bytes < 1:
            raise ValueError("kv_cache_bytes: must be positive")
        self.check_cache_options()
