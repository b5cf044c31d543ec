"""Which dtype a stage computes in, resolved without torch (the router keys its cache on the encoders' dtype)."""

from __future__ import annotations

import pathlib

from mmserve.models.family import read_config

# CPU feature flags (x86 "flags", Arm "Features") of hardware bfloat16 / float16 arithmetic.
CPU_NATIVE_FLAGS = {"bfloat16": {"avx512_bf16", "amx_bf16", "bf16"}, "float16": {"avx512_fp16", "amx_fp16", "fphp"}}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them; empty elsewhere."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_dtype_name(name: str, model_dir: str, flags: set[str] | None = None) -> str:
    """The dtype name a CPU stage of this host computes in for --dtype name (loading.resolve_dtype's rule):
    "auto" takes the checkpoint's declared dtype when the CPU runs it in hardware, else float32."""
    if name != "auto":
        return name
    config = read_config(model_dir)
    declared = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    flags = cpu_flags() if flags is None else flags
    return declared if declared == "float32" or flags & CPU_NATIVE_FLAGS.get(declared, set()) else "float32"
