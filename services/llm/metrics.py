"""Prometheus metrics of the LLM engine (served on the service's --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STEP_SECONDS = Histogram("mmserve_llm_step_seconds", "Wall time of one engine step",
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
STEP_TOKENS = Histogram("mmserve_llm_step_tokens", "Tokens computed in one engine step",
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192))
RUNNING = Gauge("mmserve_llm_running_sequences", "Sequences holding KV blocks")
WAITING = Gauge("mmserve_llm_waiting_sequences", "Sequences queued for admission")
KV_BLOCKS_USED = Gauge("mmserve_llm_kv_blocks_used", "KV cache blocks in use")
PROMPT_TOKENS = Counter("mmserve_llm_prompt_tokens_total", "Prompt tokens admitted")
CACHED_PROMPT_TOKENS = Counter("mmserve_llm_prefix_cache_hit_tokens_total", "Prompt tokens served by prefix caching")
GENERATED_TOKENS = Counter("mmserve_llm_generated_tokens_total", "Tokens generated")
PREEMPTIONS = Counter("mmserve_llm_preemptions_total", "Sequences preempted for lack of KV blocks")
FINISHED = Counter("mmserve_llm_requests_finished_total", "Requests ended, by reason", ["reason"])
MEDIA_CHUNKS = Counter("mmserve_llm_media_chunks_received_total", "Streamed media chunks received")
MEDIA_WAIT_SECONDS = Histogram("mmserve_llm_media_wait_seconds",
                               "Time a streamed prompt's prefill waited for its media chunks, per request",
                               buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
MEDIA_WAITING = Gauge("mmserve_llm_media_waiting_sequences", "Sequences holding KV blocks while waiting for a chunk")
