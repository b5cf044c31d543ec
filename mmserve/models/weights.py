"""Loads one part of a checkpoint (a vision tower, a projector, a text model) from its safetensors, by key prefix."""

from __future__ import annotations

import json
import pathlib
import re

import torch
from safetensors import safe_open


def _shards(model_dir: str | pathlib.Path) -> list[pathlib.Path]:
    root = pathlib.Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.exists():
        return sorted({root / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [root / "model.safetensors"]


def load_part(module: torch.nn.Module, model_dir: str | pathlib.Path, pattern: str,
              dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.nn.Module:
    """Fill module with the checkpoint tensors whose names match pattern (a regex of the prefix, stripped);
    every parameter and persistent buffer must be found. Returns the module in eval mode."""
    prefix = re.compile(pattern)
    state = {}
    for shard in _shards(model_dir):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if (m := prefix.match(name)) is not None:
                    state[name[m.end():]] = f.get_tensor(name)
    missing, _ = module.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"checkpoint {model_dir}: lacks {sorted(missing)[:5]} under {pattern}")
    if dtype is not None:
        module.to(dtype)
    return module.to(device or "cpu").eval()


def read_tensor(model_dir: str | pathlib.Path, *names: str) -> torch.Tensor:
    """One tensor of the checkpoint, under the first of names it holds (layouts differ between exports)."""
    for shard in _shards(model_dir):
        with safe_open(str(shard), framework="pt") as f:
            for name in names:
                if name in f.keys():
                    return f.get_tensor(name)
    raise ValueError(f"checkpoint {model_dir}: lacks {' or '.join(names)}")


def load_text_model(cls, config, model_dir, pattern: str, dtype=None, device=None):
    """A text model (built from its config, filled from the tensors under pattern) and its lm_head weight
    (the input embeddings when tied)."""
    model = load_part(cls._from_config(config.text_config), model_dir, pattern, dtype, device)
    if config.tie_word_embeddings or getattr(config.text_config, "tie_word_embeddings", False):
        return model, model.get_input_embeddings().weight
    return model, read_tensor(model_dir, "lm_head.weight", "language_model.lm_head.weight").to(model.dtype).to(model.device)
