"""A decoder layer's projections as the llm runs them: q, k and v in one matmul, an MLP's gate and up in another,
and on a CPU with bfloat16 every weight packed once in oneDNN's blocked layout.

A decode step multiplies a few rows by each weight, so a matmul costs its call as much as its arithmetic: a
parallel region woken, a kernel launched, and on a CPU the plain weight re-blocked for oneDNN's kernel on every
call. Fusing cuts a dense layer's seven matmuls to four; packing does the re-blocking once, at start. Every
output is the same dot product as before, bit for bit (packing is checked against plain weights at start).
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import dataclasses
import functools
import mmap

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class Projection:
    """One linear, or several of one input as one matmul: called, their outputs (a tuple when several)."""

    weight: torch.Tensor  # [sum of the out features, in features]; plain, or packed for oneDNN (is_mkldnn)
    bias: torch.Tensor | None
    splits: tuple[int, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.weight.is_mkldnn:
            out = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")
        else:
            out = F.linear(x, self.weight, self.bias)
        return out.split(self.splits, -1) if len(self.splits) > 1 else out


@dataclasses.dataclass(frozen=True)
class LayerProjections:
    """A decoder layer's matmuls; None where the layer's own module runs (a mixture of experts' MLP)."""

    qkv: Projection | None
    o: Projection | None
    gate_up: Projection | None
    down: Projection | None


def fuse(linears: list[nn.Module], replaced: list[tuple[int, int]] | None = None) -> Projection | None:
    """The linears as one projection, whose weight the modules' parameters become views of (the model holds no
    second copy); None when they cannot share one (not plain nn.Linear, another dtype or device, a bias on some
    and not others). The byte ranges of the weights it replaces are added to replaced."""
    if not all(type(m) is nn.Linear for m in linears):
        return None
    weights, biases = [m.weight for m in linears], [m.bias for m in linears]
    if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1 or len({b is None for b in biases}) != 1:
        return None
    splits = tuple(w.shape[0] for w in weights)
    if len(linears) == 1:
        return Projection(weights[0].detach(), None if biases[0] is None else biases[0].detach(), splits)
    weight = torch.cat([w.detach() for w in weights])
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    if replaced is not None:
        replaced += [_byte_range(t) for t in weights + biases if t is not None]
    for m, w, b in zip(linears, weight.split(splits), bias.split(splits) if bias is not None else [None] * len(splits)):
        m.weight = nn.Parameter(w, requires_grad=False)
        if b is not None:
            m.bias = nn.Parameter(b, requires_grad=False)
    return Projection(weight, bias, splits)


def model_projections(text_model, lm_head: torch.Tensor,
                      device: torch.device) -> tuple[list[LayerProjections], Projection]:
    """Each decoder layer's projections and the lm_head's; then, once, the memory the weights they replaced held is
    given back. Packed, a projection holds the only copy of its weights: the layer's own linears are left empty
    (calling one raises); a packed lm_head's plain tensor is the caller's to drop."""
    replaced: list[tuple[int, int]] = []
    layers = [_layer_projections(layer, device, replaced) for layer in text_model.layers]
    head = output_projection(lm_head, text_model.get_input_embeddings().weight, device, replaced)
    _give_back_freed_memory(device, replaced)
    return layers, head


def _layer_projections(layer, device: torch.device, replaced: list[tuple[int, int]]) -> LayerProjections:
    """A decoder layer's projections, fused, and packed where packs_exactly says so."""
    attn, mlp = layer.self_attn, layer.mlp
    gated = all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
    groups = [[attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj],
              [mlp.gate_proj, mlp.up_proj] if gated else None, [mlp.down_proj] if gated else None]
    fused = [fuse(group, replaced) if group else None for group in groups]
    if device.type == "cpu":
        fused = [_packed(p, group, replaced) if p is not None and packs_exactly(p.weight.dtype) else p
                 for p, group in zip(fused, groups)]
    return LayerProjections(*fused)


def output_projection(lm_head: torch.Tensor, embeddings: torch.Tensor, device: torch.device,
                      replaced: list[tuple[int, int]] | None = None) -> Projection:
    """The lm_head as a projection, packed as the layers' are; not when it is the input embeddings (tied), whose
    lookup needs the plain tensor: a packed copy beside it would double the model's largest weight. The byte range
    of a weight it packs is added to replaced."""
    head = Projection(lm_head, None, (lm_head.shape[0],))
    is_tied = lm_head.untyped_storage().data_ptr() == embeddings.untyped_storage().data_ptr()
    if device.type != "cpu" or is_tied or not packs_exactly(lm_head.dtype):
        return head
    return _packed(head, [], [] if replaced is None else replaced)


@functools.cache
def packs_exactly(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN takes packed weights of dtype with results bit for bit F.linear's: bfloat16 on a
    CPU that has it in hardware (float32 stays on MKL's kernels, which take the plain weight)."""
    if dtype != torch.bfloat16 or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator).to(dtype)
    bias = torch.randn(96, generator=generator).to(dtype)
    x = torch.randn(5, 64, generator=generator).to(dtype)
    try:
        packed = Projection(torch.ops.mkldnn._reorder_linear_weight(weight), bias, (96,))
    except RuntimeError:
        return False
    return torch.equal(packed(x), F.linear(x, weight, bias))


def _packed(projection: Projection, linears: list[nn.Module], replaced: list[tuple[int, int]]) -> Projection:
    """The projection with its weight packed; the linears that held the plain weight are emptied, and its byte range
    is added to replaced."""
    weight = torch.ops.mkldnn._reorder_linear_weight(projection.weight)
    replaced.append(_byte_range(projection.weight))
    for m in linears:  # the plain weight's last references
        m.weight = nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=False)
    return dataclasses.replace(projection, weight=weight)


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.data_ptr() + t.nbytes


def _give_back_freed_memory(device: torch.device, replaced: list[tuple[int, int]]) -> None:
    """Memory freed stays with the process: glibc's heap keeps it until malloc_trim, CUDA's caching allocator
    until empty_cache, and the replaced weights' pages of the checkpoint's file until they are dropped (tensors
    read from safetensors map the whole file, which the model's other tensors keep mapped). Kept, it is as much
    memory again as the weights replaced."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif libc_name := ctypes.util.find_library("c"):
        libc = ctypes.CDLL(libc_name)
        getattr(libc, "malloc_trim", lambda pad: 0)(0)
        _drop_file_pages(libc, replaced)


def _drop_file_pages(libc, ranges: list[tuple[int, int]]) -> None:
    """Drops the whole pages of the ranges that lie in a private mapping of a file. Only there is it safe whatever
    still maps them: a dropped page read again is read from the file, which holds the same bytes."""
    madvise = getattr(libc, "madvise", None)
    if madvise is None or not ranges:
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    mappings = _file_mappings()
    starts = [start for start, _ in mappings]
    for begin, end in ranges:
        i = bisect.bisect_right(starts, begin) - 1
        if i < 0 or end > mappings[i][1]:
            continue  # not (wholly) in a file's mapping: anonymous memory, which malloc_trim took care of
        first, last = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            madvise(first, last - first, mmap.MADV_DONTNEED)


def _file_mappings() -> list[tuple[int, int]]:
    """The address ranges of this process's private mappings of files, in order (/proc/self/maps)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    mappings = []
    for line in lines:
        fields = line.split(maxsplit=5)
        # address, permissions, offset, device, inode, path: a file has an inode; "p" is private
        if len(fields) == 6 and fields[4] != "0" and fields[1].endswith("p"):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            mappings.append((start, end))
    return sorted(mappings)
