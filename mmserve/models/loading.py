"""Loads only the part of a Qwen2.5-VL checkpoint a stage needs: built on the meta device, filled from the
safetensors (mmserve.models.weights), as transformers' from_pretrained would hold it."""

from __future__ import annotations

import importlib.util
import pathlib

import torch
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLTextModel,
)

from mmserve.models import weights
from mmserve.models.dtypes import CPU_NATIVE_FLAGS, cpu_flags  # noqa: F401 (cpu_flags: part of this API)

# Hub checkpoints store `visual.*`, `model.*` and `lm_head.*`; transformers 5 saves `model.visual.*` and
# `model.language_model.*`. These patterns strip either prefix, so each tower loads alone.
_VISION_KEYS = r"^(model\.)?visual\."
_TEXT_KEYS = r"^model\.(language_model\.)?"


def checkpoint_dir(model: str) -> pathlib.Path:
    """The local directory of a checkpoint: model itself, or the hub snapshot of its configs and weights."""
    root = pathlib.Path(model)
    if root.is_dir():
        return root
    from huggingface_hub import snapshot_download

    return pathlib.Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors"]))


def load_config(model: str) -> PreTrainedConfig:
    """The full Qwen2.5-VL config of a local directory or hub id."""
    return AutoConfig.from_pretrained(model)


def resolve_device(name: str) -> torch.device:
    """The device to run on: "auto" picks the first visible GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_dtypes(device: torch.device, flags: set[str] | None = None) -> set[torch.dtype]:
    """Half-precision dtypes the device computes in hardware (emulated ones are slower than float32)."""
    if device.type == "cuda":
        return {torch.float16} | ({torch.bfloat16} if torch.cuda.is_bf16_supported() else set())
    flags = cpu_flags() if flags is None else flags
    return {getattr(torch, name) for name, native in CPU_NATIVE_FLAGS.items() if flags & native}


def resolve_dtype(name: str, model: str, device: torch.device, flags: set[str] | None = None) -> torch.dtype:
    """The dtype to compute in: "auto" takes the checkpoint's own (Qwen2.5-VL ships bfloat16) when the device
    runs it in hardware, else float32; any other name is taken as given."""
    if name != "auto":
        return getattr(torch, name)
    declared = getattr(load_config(model), "dtype", None) or torch.float32
    declared = getattr(torch, declared) if isinstance(declared, str) else declared
    if declared == torch.float32 or declared in native_dtypes(device, flags):
        return declared
    return torch.float32


def attention_backend(device: torch.device) -> str:
    """flash-attn's varlen kernels on a GPU when installed, PyTorch SDPA otherwise (chosen by capability)."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_vision_tower(model: str, dtype: torch.dtype = torch.float32,
                      device: torch.device = torch.device("cpu")) -> Qwen2_5_VisionTransformerPretrainedModel:
    """Only the vision tower (patch embed, blocks, merger), in eval mode on device."""
    config = load_config(model).vision_config
    # Built in dtype by transformers' own rule (its rotary buffers stay float32), as from_pretrained builds it.
    return weights.load_part(lambda: Qwen2_5_VisionTransformerPretrainedModel._from_config(
        config, dtype=dtype, attn_implementation=attention_backend(device)), checkpoint_dir(model), _VISION_KEYS,
        device=device)


def load_language_model(model: str, dtype: torch.dtype = torch.float32) -> tuple[Qwen2_5_VLTextModel, torch.Tensor]:
    """Only the language model and its lm_head weight (the input embeddings when tied), in eval mode."""
    config, root = load_config(model), checkpoint_dir(model)
    text = weights.load_part(lambda: Qwen2_5_VLTextModel._from_config(config.text_config, dtype=dtype), root,
                             _TEXT_KEYS)
    if config.tie_word_embeddings or getattr(config.text_config, "tie_word_embeddings", False):
        return text, text.embed_tokens.weight
    return text, weights.read_tensor(root, "lm_head.weight").to(dtype)
