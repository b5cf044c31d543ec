"""Settings of the LLM service."""

from __future__ import annotations

import dataclasses

from mmserve.config import CacheOptions, ModelOptions, ServiceConfig, option, with_default


@dataclasses.dataclass(frozen=True)
class LlmConfig(ServiceConfig, CacheOptions, ModelOptions):
    """LLM service: the language model with continuous batching over a paged KV cache; reads cached embeddings."""

    max_num_seqs: int = option(64, "sequences running at once")
    max_num_batched_tokens: int = option(2048, "tokens computed per engine step (chunked prefill budget)")
    step_tpot_share: float = option(0.75, "while sequences with a time-per-token target decode, a step prefills "
                                          "only what its time model says fits before each one's next token is due, "
                                          "token k at k times this share of its target after its first (0: the "
                                          "token budget alone)")
    min_prefill_tokens: int = option(32, "prompt tokens a step may always prefill, however tight the targets of "
                                         "the sequences decoding in it")
    step_max_ahead_tokens: float = option(4.0, "a sequence ahead of its time-per-token schedule lends one step at "
                                               "most this many of its tokens' time (bounds a long answer's stalls)")
    block_size: int = option(0, "tokens per KV block (0: 256 where flash-attn's paged kernels run, as they need a "
                                "multiple of 256; else 16)")
    prefix_caching: bool = option(True, "reuse the KV cache of a prompt prefix computed before (the same system "
                                        "prompt, the same media at the same place)")
    cuda_graphs: bool = option(True, "replay decode steps from CUDA graphs captured at start (GPU with flash-attn)")
    kv_cache_bytes: int = option(512 * 1024 * 1024, "memory for the KV cache")
    max_model_len: int = option(32768, "longest prompt plus output, in tokens")
    max_queue: int = with_default(ModelOptions, "max_queue", 1024)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_model_options()
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.min_prefill_tokens) < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens, min_prefill_tokens: must be positive")
        if not 0 <= self.step_tpot_share <= 1:
            raise ValueError("step_tpot_share: must be within [0, 1]")
        if self.step_max_ahead_tokens < 1:
            raise ValueError("step_max_ahead_tokens: must be at least 1")
        if self.block_size < 0:
            raise ValueError("block_size: must not be negative")
        if self.max_model_len < 2:
            raise ValueError("max_model_len: must be at least 2")
        if self.kv_cache_bytes < 1:
            raise ValueError("kv_cache_bytes: must be positive")
        self.check_cache_options()
