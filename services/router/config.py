"""Settings of the router service."""

from __future__ import annotations

import dataclasses

from mmserve.config import AuthOptions, CacheOptions, ServiceConfig, option
from mmserve.sampling import DEFAULT_MAX_TOP_LOGPROBS


@dataclasses.dataclass(frozen=True)
class RouterConfig(ServiceConfig, CacheOptions, AuthOptions):
    """Router service: the public API; validates, consults the cache, orchestrates decode → encode → llm."""

    model: str = option("", "checkpoint directory or hub id (preprocessing defaults, cache keys)")
    encoder_dtype: str = option("auto", "compute dtype of the encoders, part of every cache key (a cached entry of "
                                        "another dtype is a miss); auto resolves as a CPU encoder on this host "
                                        "would: name the dtype when the encoders run on GPUs")
    decoder_addrs: str = option("", "comma-separated decoder replica addresses")
    encoder_addrs: str = option("", "comma-separated encoder replica addresses")
    llm_addrs: str = option("", "comma-separated llm replica addresses")
    flex_addrs: str = option("", "flex replicas (python -m stack.flex: vision tower and language model in one "
                                 "process) as encoder_address/llm_address, comma-separated; each serves in one "
                                 "pool at a time and is moved to the stage that backs up")
    unified_addrs: str = option("", "unified replicas (python -m stack.unified: vision tower and language model "
                                    "sharing one device at once) as encoder_address/llm_address, comma-separated; "
                                    "each serves in both pools, every prediction for one role including the "
                                    "other's load")
    unified_decode_slowdown: float = option(1.2, "the unified replicas' --max-decode-slowdown: while their llm "
                                                 "decodes, their encoder gets 1 - 1/this of the device, and their "
                                                 "decode steps take up to this times longer while it encodes")
    unified_overlap_share: float = option(0.0, "the unified replicas' --overlap-threads over their llm's threads: "
                                               "while both roles have work each runs on its share of the cores "
                                               "(0: they take turns, priced by unified_decode_slowdown)")
    role_switch_ratio: float = option(3.0, "move a flex replica when one stage's backlog per replica exceeds "
                                           "this times the other's")
    role_switch_min_backlog_ms: float = option(200.0, "and that backlog per replica is at least this")
    role_switch_sustain_s: float = option(2.0, "and the imbalance has lasted this long")
    role_switch_dwell_s: float = option(10.0, "a flex replica stays at least this long in a pool")
    media_root: str = option("", "directory file:// URIs may read from (empty disables file://)")
    files_in_place: bool = option(True, "the decoders read file:// media where it lies (they mount the media root "
                                        "at the same path, as mmserve up, compose and k8s give it): the router "
                                        "hashes the file in constant memory and never holds its bytes; false: the "
                                        "router reads it and sends the bytes")
    max_media_bytes: int = option(200 * 1024 * 1024, "largest encoded media file accepted")
    max_media_per_request: int = option(16, "images plus videos in one request")
    max_messages: int = option(256, "messages in one request")
    max_tokens_limit: int = option(8192, "largest max_tokens a request may ask for")
    max_top_logprobs: int = option(DEFAULT_MAX_TOP_LOGPROBS, "most alternatives a request may ask for at each token (top_logprobs)")
    max_item_pixels: int = option(0, "largest pixel budget (min_pixels/max_pixels) a request may set for one image "
                                     "or video frame; requests may narrow the model's own bounds "
                                     "(preprocessor_config.json), never widen them (0: the model's max_pixels)")
    max_video_frames: int = option(768, "most frames a request may have sampled from one video (its max_frames)")
    max_vision_tokens: int = option(16384, "vision tokens of all media of one request together, counted from the "
                                           "planned grids before any decode")
    max_model_len: int = option(32768, "context length of the llm replicas (prompt plus max_tokens; the llm's "
                                       "--max-model-len, capped by the checkpoint's max_position_embeddings): a "
                                       "request that cannot fit is refused before any media work")
    max_slo_ttft_ms: float = option(0.0, "largest slo.ttft_ms a request may ask for (0: its class's default target: "
                                         "tighter targets only)")
    max_slo_tpot_ms: float = option(0.0, "largest slo.tpot_ms a request may ask for (0: the default target)")
    policy: str = option("slo", "slo (least-slack ordering, admission, p2c replica choice with cache affinity) "
                                "or fcfs (arrival order, round-robin, no admission control)")
    slo_ttft_ms_video: float = option(8000.0, "default time-to-first-token target of requests with a video")
    slo_ttft_ms_image: float = option(3000.0, "default time-to-first-token target of requests with images")
    slo_ttft_ms_text: float = option(1000.0, "default time-to-first-token target of text-only requests")
    slo_tpot_ms: float = option(200.0, "default time-per-output-token target")
    admission_headroom: float = option(1.0, "refuse a request whose calibrated predicted TTFT (or time per token) "
                                            "exceeds this times its target")
    admission_target: float = option(0.9, "share of admitted requests that should meet their SLO: admission "
                                           "plans for a quantile of its prediction errors that outcomes move")
    admission_probe_after_s: float = option(5.0, "when an idle stack has refused everything this long, admit the "
                                                 "next request predicted to miss by at most 4x as a probe that "
                                                 "re-measures the cost models (0: never)")
    stream_prefill: bool = option(True, "send the llm a media request's planned prompt at once, then each chunk's "
                                        "embeddings as an encoder finishes it (GenerateStreamed), so decode, encode "
                                        "and prefill overlap; --no-stream-prefill waits for every embedding first")
    video_chunk_frames: int = option(16, "streamed prefill: sampled frames per video chunk, a fixed window rounded to "
                                         "the family's temporal group (chunk cache keys follow it)")
    max_chunks_in_flight: int = option(4, "streamed prefill: chunks of one request decoded but not yet encoded, or "
                                          "encoded but not yet sent to the llm (also the decoder's decode-ahead)")
    decoder_max_in_flight: int = option(2, "decode calls one decoder replica gets at once (slo policy)")
    encoder_max_in_flight: int = option(4, "encode calls one encoder replica gets at once (slo policy)")
    stage_attempts: int = option(3, "tries of a stage on different replicas when one is unavailable")
    stage_max_waiting: int = option(256, "decode or encode calls that may wait for a replica slot; beyond it a "
                                         "request gets RESOURCE_EXHAUSTED at once (slo policy)")
    replica_keepalive_ms: int = option(1000, "HTTP/2 ping interval on the channels to the replicas, to notice one that "
                                             "stalls (stopped, wedged) while its TCP connection stays up; at least "
                                             "500, the most frequent pings the services accept")
    replica_keepalive_timeout_ms: int = option(2000, "a replica that leaves a ping unanswered this long has its "
                                                     "calls failed (UNAVAILABLE, retried elsewhere when nothing was "
                                                     "streamed) and gets no work until its health says SERVING")
    replica_reconnect_max_ms: int = option(2000, "longest pause between reconnection attempts to a replica that went "
                                                 "away or has not started (and, up to 1 s, between its health "
                                                 "checks), so one that serves is used soon")
    registry_refresh_s: float = option(1.0, "seconds between reads of the replica registry")
    startup_wait_s: float = option(60.0, "at start, seconds to wait for a healthy replica of each stage")
    warmup: bool = option(True, "profile every replica with a small image and text request at start")
    request_timeout_s: float = option(600.0, "deadline for a request without one of its own")
    fetch_timeout_s: float = option(10.0, "time limit for fetching one http(s) media URL, redirects included")
    fetch_allow_private: bool = option(False, "let http(s) media URLs reach loopback, private and link-local "
                                              "addresses (trusted networks and tests only)")
    fetch_max_redirects: int = option(3, "redirects followed when fetching an http(s) media URL")
    http_port: int = option(0, "OpenAI-compatible HTTP port (0 disables)")
    http_max_body_bytes: int = option(0, "largest HTTP request body; a larger one is answered 413 before it is "
                                         "read (0: 4/3 of max_message_bytes plus 1 MiB, what the largest gRPC "
                                         "request takes as JSON with base64 media)")
    served_model_name: str = option("", "model name reported by the HTTP API (default: the model directory name)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise ValueError("model: required")
        for name in ("max_media_bytes", "max_media_per_request", "max_messages", "max_tokens_limit",
                     "max_vision_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive")
        if self.max_top_logprobs < 0:
            raise ValueError("max_top_logprobs: must not be negative")
        if self.max_video_frames < 2:
            raise ValueError("max_video_frames: must be at least 2")
        if self.max_item_pixels < 0 or self.max_slo_ttft_ms < 0 or self.max_slo_tpot_ms < 0:
            raise ValueError("max_item_pixels, max_slo_ttft_ms, max_slo_tpot_ms: must not be negative")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s: must be positive")
        if not 0 <= self.http_port < 65536:
            raise ValueError("http_port: must be in 0..65535")
        if self.http_max_body_bytes < 0:
            raise ValueError("http_max_body_bytes: must not be negative")
        if not self.fetch_timeout_s > 0 or self.fetch_max_redirects < 0:
            raise ValueError("fetch_timeout_s: must be positive; fetch_max_redirects: not negative")
        self.check_cache_options()
        if self.policy not in ("slo", "fcfs"):
            raise ValueError("policy: must be slo or fcfs")
        for name in ("slo_ttft_ms_video", "slo_ttft_ms_image", "slo_ttft_ms_text", "slo_tpot_ms",
                     "admission_headroom", "registry_refresh_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive")
        if self.replica_keepalive_ms < 500 or min(self.replica_keepalive_timeout_ms, self.replica_reconnect_max_ms) < 1:
            raise ValueError("replica_keepalive_ms: must be at least 500; replica_keepalive_timeout_ms, "
                             "replica_reconnect_max_ms: must be positive")
        for name in ("decoder_max_in_flight", "encoder_max_in_flight", "stage_attempts", "stage_max_waiting",
                     "video_chunk_frames", "max_chunks_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")
        if self.admission_probe_after_s < 0:
            raise ValueError("admission_probe_after_s: must not be negative")
        if not 0 < self.admission_target < 1:
            raise ValueError("admission_target: must be between 0 and 1")
        self.flex_pairs()  # raises ValueError naming a malformed entry
        self.unified_pairs()
        if self.unified_decode_slowdown <= 1.0:
            raise ValueError("unified_decode_slowdown: must exceed 1")
        if not 0.0 <= self.unified_overlap_share < 1.0:
            raise ValueError("unified_overlap_share: must be in [0, 1)")
        if self.role_switch_ratio <= 1.0 or min(self.role_switch_min_backlog_ms, self.role_switch_sustain_s,
                                                self.role_switch_dwell_s) < 0:
            raise ValueError("role_switch_ratio: must exceed 1; role_switch_min_backlog_ms, role_switch_sustain_s, "
                             "role_switch_dwell_s: not negative")
        if not self.registry_url:
            for name in ("decoder_addrs", "encoder_addrs", "llm_addrs"):
                if not getattr(self, name) and not (name != "decoder_addrs" and self.unified_addrs):
                    raise ValueError(f"{name}: at least one address is required without a registry")

    def http_body_limit(self) -> int:
        """The largest HTTP request body accepted, in bytes."""
        return self.http_max_body_bytes or self.max_message_bytes * 4 // 3 + (1 << 20)

    def flex_pairs(self) -> list[tuple[str, str]]:
        """The flex replicas as (encoder address, llm address) pairs."""
        return self._pairs("flex_addrs")

    def unified_pairs(self) -> list[tuple[str, str]]:
        """The unified replicas as (encoder address, llm address) pairs."""
        return self._pairs("unified_addrs")

    def _pairs(self, name: str) -> list[tuple[str, str]]:
        pairs = []
        for entry in self.split(getattr(self, name)):
            if (pair := self.pair(entry)) is None:
                raise ValueError(f"{name}: {entry!r} is not encoder_address/llm_address")
            pairs.append(pair)
        return pairs

    @staticmethod
    def pair(entry: str) -> tuple[str, str] | None:
        """An `encoder_address/llm_address` entry as its two addresses; None when it is not one."""
        encoder, sep, llm = (part.strip() for part in entry.partition("/"))
        return (encoder, llm) if sep and encoder and llm and "/" not in llm else None

    @staticmethod
    def split(addresses: str) -> list[str]:
        """A comma-separated address list as a list."""
        return [a.strip() for a in addresses.split(",") if a.strip()]
