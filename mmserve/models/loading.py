"""Loads only the part of a Qwen2.5-VL checkpoint a stage needs, through transformers' from_pretrained."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import pathlib

import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLTextModel,
)

from mmserve.models.dtypes import CPU_NATIVE_FLAGS, cpu_flags  # noqa: F401 (cpu_flags: part of this API)

# Hub checkpoints store `visual.*`, `model.*` and `lm_head.*`; transformers 5 maps `model.*` to
# `model.language_model.*` on load. These patterns strip the prefixes so each tower loads alone.
_VISION_KEYS = {r"^(model\.)?visual\.": ""}
_TEXT_KEYS = {r"^model\.language_model\.": ""}


@contextlib.contextmanager
def _quiet_load_report():
    # The load report lists the other tower's weights as "unexpected"; we check missing keys ourselves.
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous)
        transformers.logging.enable_progress_bar()


def _check_loaded(name: str, info: dict) -> None:
    if info["missing_keys"]:
        raise ValueError(f"{name}: checkpoint lacks {sorted(info['missing_keys'])[:5]}")


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
    with _quiet_load_report():
        tower, info = Qwen2_5_VisionTransformerPretrainedModel.from_pretrained(
            model, key_mapping=_VISION_KEYS, dtype=dtype, output_loading_info=True,
            attn_implementation=attention_backend(device))
    _check_loaded("vision tower", info)
    return tower.to(device).eval()


def load_language_model(model: str, dtype: torch.dtype = torch.float32) -> tuple[Qwen2_5_VLTextModel, torch.Tensor]:
    """Only the language model and its lm_head weight, in eval mode."""
    with _quiet_load_report():
        text, info = Qwen2_5_VLTextModel.from_pretrained(
            model, key_mapping=_TEXT_KEYS, dtype=dtype, output_loading_info=True)
    _check_loaded("language model", info)
    config = load_config(model)
    if config.tie_word_embeddings or getattr(config.text_config, "tie_word_embeddings", False):
        lm_head = text.embed_tokens.weight
    else:
        lm_head = _read_tensor(model, "lm_head.weight").to(dtype)
    return text.eval(), lm_head


def _read_tensor(model: str, name: str) -> torch.Tensor:
    """One tensor from a (possibly sharded) safetensors checkpoint, read without loading the rest."""
    root = pathlib.Path(model)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        root = pathlib.Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors"]))
    index = root / "model.safetensors.index.json"
    filename = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(str(root / filename), framework="pt") as f:
        return f.get_tensor(name)
