"""Loads one part of a checkpoint (a vision tower, a projector, a text model) from its safetensors, by key prefix."""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
from collections.abc import Callable

import torch
from safetensors import safe_open


def _shards(model_dir: str | pathlib.Path) -> list[pathlib.Path]:
    root = pathlib.Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.exists():
        return sorted({root / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [root / "model.safetensors"]


@contextlib.contextmanager
def parameters_on_meta():
    """Parameters created inside live on the meta device: no memory, and their random init costs nothing. Buffers
    stay real: non-persistent ones (rotary frequencies) are computed in __init__ and are in no checkpoint. It patches
    torch.nn.Module while inside: build one model at a time."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def load_part(build: Callable[[], torch.nn.Module], model_dir: str | pathlib.Path, pattern: str,
              dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.nn.Module:
    """The module build() makes, its parameters filled with the checkpoint tensors whose names match pattern (a
    regex of the prefix, stripped). Built on the meta device, then each tensor it holds is read once and becomes
    the parameter (no random init, no second copy); every parameter and persistent buffer must be found. Tensors
    take the dtype they were built in, or dtype, which then casts the whole module, buffers included (a builder
    that builds in the wanted dtype keeps the buffers it makes, as transformers' from_pretrained does). Returns
    the module in eval mode on device."""
    with parameters_on_meta():
        module = build()
    prefix, wanted = re.compile(pattern), module.state_dict()  # meta parameters cost nothing here
    state = {}
    for shard in _shards(model_dir):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if (m := prefix.match(name)) is not None and (key := name[m.end():]) in wanted:
                    state[key] = f.get_tensor(name).to(device or "cpu", dtype or wanted[key].dtype)
    missing, _ = module.load_state_dict(state, strict=False, assign=True)
    if missing:
        raise ValueError(f"checkpoint {model_dir}: lacks {sorted(missing)[:5]} under {pattern}")
    if dtype is not None:
        module.to(dtype)  # the buffers; the parameters are in dtype already
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
    (the input embeddings when tied: one tensor, not a copy)."""
    model = load_part(lambda: cls._from_config(config.text_config), model_dir, pattern, dtype, device)
    if config.tie_word_embeddings or getattr(config.text_config, "tie_word_embeddings", False):
        return model, model.get_input_embeddings().weight
    return model, read_tensor(model_dir, "lm_head.weight", "language_model.lm_head.weight").to(model.device,
                                                                                               model.dtype)
