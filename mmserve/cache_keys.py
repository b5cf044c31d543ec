"""Embedding-cache keys: content hash + model fingerprint + every parameter that changes the result."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

# Bump when the decode/resize/patchify code changes what a given input produces.
PREPROCESS_VERSION = 1
_FULL_HASH_LIMIT = 256 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class MediaParams:
    """The effective preprocessing parameters of one media item."""

    kind: str  # "image" or "video"
    fps: float = 0.0
    min_frames: int = 0
    max_frames: int = 0
    min_pixels: int = 0
    max_pixels: int = 0
    total_pixels: int = 0


def model_fingerprint(model: str) -> str:
    """Identifies a checkpoint: hub id or path plus a hash of its config and weights."""
    root = pathlib.Path(model)
    h = hashlib.sha256(model.encode())
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.suffix in {".json", ".safetensors"})
        total = sum(p.stat().st_size for p in files)
        for p in files:
            h.update(p.name.encode())
            if total <= _FULL_HASH_LIMIT or p.suffix == ".json":
                h.update(p.read_bytes())
            else:
                # Real checkpoints are GBs: name, size and mtime identify a revision well enough.
                st = p.stat()
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def encoder_id(model_fingerprint: str, family: str, dtype: str) -> str:
    """What made an entry: the checkpoint, its family and the encoders' compute dtype (a float32 and a bfloat16
    tower give different embeddings, so a fleet mixing them must not share entries)."""
    return f"{model_fingerprint}:{family}:{dtype}"


def media_key(data_sha256: str, model_id: str, params: MediaParams, chunk_index: int = 0) -> str:
    """The Redis key of one media item's (or temporal chunk's) embeddings; model_id is an encoder_id."""
    blob = json.dumps(
        {"media": data_sha256, "model": model_id, "pre": PREPROCESS_VERSION, "chunk": chunk_index,
         **dataclasses.asdict(params)},
        sort_keys=True,
    )
    return "mmserve:emb:v1:" + hashlib.sha256(blob.encode()).hexdigest()


def window_key(item_key: str, chunk_frames: int, chunk_index: int) -> str:
    """The key of one fixed window of a video (chunk_frames sampled frames, chunk_index-th): from the item's key and
    the window alone, never from how a decode was split, so every request for the same bytes agrees on it."""
    blob = json.dumps({"item": item_key, "window": chunk_frames, "chunk": chunk_index}, sort_keys=True)
    return "mmserve:emb:v1:" + hashlib.sha256(blob.encode()).hexdigest()
