"""Workload shapes for the load test: what each request holds, built as plain GenerateRequests (no Locust, no gevent)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping

from mmserve.v1 import api_pb2

KINDS = ("video", "image", "text")
# Share of each request class in a synthetic shape.
SHAPES: dict[str, dict[str, float]] = {
    "video-heavy": {"video": 0.7, "image": 0.2, "text": 0.1},
    "image-heavy": {"video": 0.1, "image": 0.7, "text": 0.2},
    "text-only": {"text": 1.0},
    "mixed": {"video": 1 / 3, "image": 1 / 3, "text": 1 / 3},
}
# Synthetic media, generated once per Locust process with mmserve.media.samples.
VIDEO_SAMPLES = (
    {"seconds": 1.0, "width": 160, "height": 120},
    {"seconds": 2.0, "width": 320, "height": 240},
    {"seconds": 4.0, "width": 320, "height": 240},
)
IMAGE_SAMPLES = (
    {"width": 64, "height": 48},
    {"width": 320, "height": 240},
    {"width": 640, "height": 480},
)
# Per class: how many earlier unique requests a cache-hit request may repeat.
_RECENT = 8


def _facts(n: int) -> str:
    return " ".join(f"Fact {i}: item {i} weighs {i * 7 % 13} kilograms." for i in range(n))


PROMPTS = {
    "video": ("What happens in this video?", "Describe the moving shapes in the clip.",
              "Summarise the video in one sentence."),
    "image": ("What is in this image?", "Describe the colours of the picture.", "Where is the white square?"),
    # Short, medium and long prompts (about 10, 500 and 2,500 tokens).
    "text": ("Write a haiku about the sea.",
             _facts(40) + " Which item is the heaviest?",
             _facts(200) + " List the items that weigh exactly 5 kilograms."),
}


@dataclasses.dataclass(frozen=True)
class MediaItem:
    """One encoded image or video sent as bytes."""

    kind: str  # "image" or "video"
    data: bytes


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    """One request of the load test; kind names its class in the Locust entries ("ttft video")."""

    kind: str
    prompt: str
    media: tuple[MediaItem, ...] = ()
    max_tokens: int = 64
    min_tokens: int = 0
    at: float = 0.0  # arrival offset in seconds (trace replay only)


def build_request(spec: RequestSpec) -> api_pb2.GenerateRequest:
    """A one-turn GenerateRequest: media first, then the prompt (the order Qwen2.5-VL was trained on)."""
    parts = [api_pb2.Part(**{m.kind: api_pb2.Media(data=m.data)}) for m in spec.media]
    parts.append(api_pb2.Part(text=spec.prompt))
    sampling = api_pb2.SamplingParams(max_tokens=spec.max_tokens)
    if spec.min_tokens:
        sampling.min_tokens = spec.min_tokens
    return api_pb2.GenerateRequest(messages=[api_pb2.Message(role="user", parts=parts)], sampling=sampling)


def parse_shape(workload: str) -> dict[str, float]:
    """The class weights of a synthetic shape name; ValueError naming the known shapes otherwise."""
    if workload not in SHAPES:
        raise ValueError(f"workload: unknown shape {workload!r} (expected {', '.join(SHAPES)} or trace:<path>)")
    return SHAPES[workload]


def make_media(kind: str, spec: Mapping) -> bytes:
    """One generated sample: spec holds keyword arguments of samples.make_video or samples.make_image."""
    from mmserve.media import samples  # PyAV and numpy only where media is generated

    if kind == "video":
        return samples.make_video(**spec)
    if kind == "image":
        return samples.make_image(**spec)
    raise ValueError(f"media: kind {kind!r} has no samples (expected video or image)")


def make_media_bank(kinds: Iterable[str], make: Callable[[str, Mapping], bytes] = make_media) -> dict[str, list[bytes]]:
    """The synthetic samples of the media kinds asked for (text needs none)."""
    sizes = {"video": VIDEO_SAMPLES, "image": IMAGE_SAMPLES}
    return {kind: [make(kind, s) for s in sizes[kind]] for kind in kinds if kind in sizes}


def tag_media(data: bytes, tag: str) -> bytes:
    """The same picture or clip with different bytes, so its content hash (and cache key) is new.

    MP4/MOV get a trailing top-level `free` box and PNG a tEXt chunk before IEND; decoders skip both.
    """
    payload = tag.encode()
    if data[4:8] == b"ftyp":
        return data + struct.pack(">I", 8 + len(payload)) + b"free" + payload
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82"):
        body = b"tEXt" + b"Comment\x00" + payload
        chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
        return data[:-12] + chunk + data[-12:]
    raise ValueError("media: only MP4/MOV and PNG samples can be tagged")


class SyntheticWorkload:
    """Draws requests of a synthetic shape; a share of them repeat an earlier request so caches can hit."""

    def __init__(self, weights: Mapping[str, float], bank: Mapping[str, list[bytes]], *, max_tokens: int,
                 cache_hit_ratio: float = 0.0, rng: random.Random | None = None, run_id: str = ""):
        if max_tokens < 1:
            raise ValueError("max_tokens: must be positive")
        if not 0.0 <= cache_hit_ratio <= 1.0:
            raise ValueError("cache_hit_ratio: must be in [0, 1]")
        missing = [k for k, w in weights.items() if w > 0 and k != "text" and not bank.get(k)]
        if missing:
            raise ValueError(f"media bank: no {', '.join(missing)} samples")
        self.kinds = [k for k, w in weights.items() if w > 0]
        self.weights = [weights[k] for k in self.kinds]
        self.bank = bank
        self.max_tokens = max_tokens
        self.cache_hit_ratio = cache_hit_ratio
        self.rng = rng or random.Random()
        # Unique across Locust processes, whose banks hold the same bytes.
        self.run_id = run_id or f"{self.rng.getrandbits(48):012x}"
        self.num_unique = 0
        self.recent: dict[str, list[RequestSpec]] = {k: [] for k in self.kinds}

    def next(self) -> RequestSpec:
        """The next request: its class by the shape's weights, then a repeat or a fresh unique request."""
        kind = self.rng.choices(self.kinds, self.weights)[0]
        recent = self.recent[kind]
        if recent and self.rng.random() < self.cache_hit_ratio:
            return self.rng.choice(recent)
        spec = self._unique(kind)
        recent.append(spec)
        del recent[:-_RECENT]
        return spec

    def _unique(self, kind: str) -> RequestSpec:
        self.num_unique += 1
        tag = f"mmserve-loadtest {self.run_id} {self.num_unique}"
        prompt = f"[{tag}] {self.rng.choice(PROMPTS[kind])}"
        media = () if kind == "text" else (MediaItem(kind, tag_media(self.rng.choice(self.bank[kind]), tag)),)
        return RequestSpec(kind, prompt, media, max_tokens=self.max_tokens, min_tokens=self.max_tokens)


@dataclasses.dataclass(frozen=True)
class TraceLine:
    """One parsed trace line; media entries are still paths (str) or sample specs (dict)."""

    at: float
    kind: str
    prompt: str
    media: tuple[str | dict, ...]
    max_tokens: int
    min_tokens: int = 0


def parse_trace_line(line: str, where: str) -> TraceLine:
    """One JSONL trace line; ValueError naming the line and the field otherwise."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object")
    unknown = set(row) - {"at", "kind", "prompt", "media", "max_tokens", "min_tokens"}
    if unknown:
        raise ValueError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    at, kind, prompt = row.get("at"), row.get("kind"), row.get("prompt", "")
    if not isinstance(at, (int, float)) or isinstance(at, bool) or at < 0:
        raise ValueError(f"{where}.at: expected seconds >= 0")
    if kind not in KINDS:
        raise ValueError(f"{where}.kind: expected one of {', '.join(KINDS)}")
    if not isinstance(prompt, str):
        raise ValueError(f"{where}.prompt: expected a string")
    media = row.get("media") or []
    media = media if isinstance(media, list) else [media]
    if kind == "text" and media:
        raise ValueError(f"{where}.media: a text request has no media")
    if kind != "text" and not media:
        raise ValueError(f"{where}.media: a {kind} request needs a file path or a sample spec")
    if not all(isinstance(m, (str, dict)) and m for m in media):
        raise ValueError(f"{where}.media: expected file paths or sample spec objects")
    if not prompt and not media:
        raise ValueError(f"{where}: neither prompt nor media")
    max_tokens, min_tokens = row.get("max_tokens", 64), row.get("min_tokens", 0)
    if not _is_int(max_tokens) or max_tokens < 1:
        raise ValueError(f"{where}.max_tokens: expected a positive integer")
    if not _is_int(min_tokens) or not 0 <= min_tokens <= max_tokens:
        raise ValueError(f"{where}.min_tokens: expected an integer in [0, max_tokens]")
    return TraceLine(float(at), kind, prompt, tuple(media), max_tokens, min_tokens)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_trace(lines: Iterable[str], source: str = "trace") -> list[TraceLine]:
    """Every non-blank, non-# line of a JSONL trace, sorted by arrival offset."""
    parsed = [parse_trace_line(line, f"{source}:{n}") for n, line in enumerate(lines, 1)
              if line.strip() and not line.lstrip().startswith("#")]
    if not parsed:
        raise ValueError(f"{source}: no requests")
    return sorted(parsed, key=lambda t: t.at)


def load_trace(path: str | pathlib.Path, make: Callable[[str, Mapping], bytes] = make_media) -> list[RequestSpec]:
    """A trace file as requests; relative media paths are read from the trace's folder, each file or spec once."""
    path = pathlib.Path(path)
    lines = parse_trace(path.read_text().splitlines(), str(path))
    loaded: dict[str, bytes] = {}

    def read(kind: str, media: str | dict) -> MediaItem:
        key = json.dumps([kind, media], sort_keys=True)
        if key not in loaded:
            try:
                loaded[key] = make(kind, media) if isinstance(media, dict) else (path.parent / media).read_bytes()
            except (TypeError, ValueError, OSError) as err:
                raise ValueError(f"{path}: {kind} {media!r}: {err}") from None
        return MediaItem(kind, loaded[key])

    return [RequestSpec(t.kind, t.prompt, tuple(read(t.kind, m) for m in t.media), max_tokens=t.max_tokens,
                        min_tokens=t.min_tokens, at=t.at) for t in lines]
