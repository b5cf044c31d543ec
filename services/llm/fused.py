"""Projections that read the same input fused into one matmul: a layer's q, k and v, an MLP's gate and up.

A decode step multiplies a few rows by each weight, so a matmul costs its call (a parallel region woken, a kernel
launched) as much as its arithmetic: fusing cuts a dense layer's seven matmuls to four. Each output column is the
same dot product as before, so the results are bit for bit those of the separate projections.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class FusedLinear:
    """Several linears of one input as one: call it for their outputs, in order."""

    weight: torch.Tensor  # [sum of the out features, in features]
    bias: torch.Tensor | None
    splits: tuple[int, ...]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight, self.bias).split(self.splits, -1)


def fuse(linears: list[nn.Module]) -> FusedLinear | None:
    """One weight for the linears, whose parameters become views of it (the model holds no second copy); None when
    they cannot share one (not plain nn.Linear, another dtype or device, a bias on some and not others)."""
    if not all(type(m) is nn.Linear for m in linears):
        return None
    weights = [m.weight for m in linears]
    biases = [m.bias for m in linears]
    if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1 or len({b is None for b in biases}) != 1:
        return None
    weight = torch.cat([w.detach() for w in weights])
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    splits = tuple(w.shape[0] for w in weights)
    for m, w, b in zip(linears, weight.split(splits), bias.split(splits) if bias is not None else [None] * len(splits)):
        m.weight = nn.Parameter(w, requires_grad=False)
        if b is not None:
            m.bias = nn.Parameter(b, requires_grad=False)
    return FusedLinear(weight, bias, splits)


def fuse_attention(attn: nn.Module) -> FusedLinear | None:
    return fuse([attn.q_proj, attn.k_proj, attn.v_proj])


def fuse_mlp(mlp: nn.Module) -> FusedLinear | None:
    """A gated MLP's gate and up (down_proj(act_fn(gate) * up)); None for any other (a mixture of experts)."""
    if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return None
    return fuse([mlp.gate_proj, mlp.up_proj])


def fuse_layers(layers, device: torch.device) -> tuple[list[FusedLinear | None], list[FusedLinear | None]]:
    """Each decoder layer's fused q, k, v and fused gate, up; the separate weights' memory is given back after."""
    fused = [(fuse_attention(layer.self_attn), fuse_mlp(layer.mlp)) for layer in layers]
    # The separate weights are freed, but an allocator keeps what it freed: glibc's heap until malloc_trim (as
    # much memory again as the fused weights), CUDA's caching allocator until empty_cache.
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif libc := ctypes.util.find_library("c"):
        getattr(ctypes.CDLL(libc), "malloc_trim", lambda pad: 0)(0)
    return [qkv for qkv, _ in fused], [gate_up for _, gate_up in fused]
