"""Runs one engine step on the language model: varlen batch, paged KV cache; attention by PyTorch SDPA, or on
an NVIDIA GPU by flash-attn's paged kernels with decode steps replayed from CUDA graphs (chosen by capability)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from services.llm.batch import Batch, block_tables, is_decode
from services.llm.block_manager import BlockManager, kv_slots
from services.llm.cuda_graphs import FLASH_PAGE, DecodeGraphs, flash_usable
from services.llm.projections import model_projections
from services.llm.prompt import MultimodalPrompt
from services.llm.scheduler import ScheduledChunk

log = logging.getLogger(__name__)

# (queries [tokens, heads, head_dim] of one layer, layer index) -> attention output, same shape.
Attend = Callable[[torch.Tensor, int], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class DeepStack:
    """One step's DeepStack injection: the batch's visual tokens and, per injected layer, the rows added there."""

    where: torch.Tensor  # [num_visual] token offsets in the step's flat batch
    layers: list[torch.Tensor]  # [num_visual, hidden] per layer, added after decoder layer i


def head_dim(config) -> int:
    """Width of one attention head: explicit in Qwen3 configs (where it may differ from hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class ModelRunner:
    """Holds the language model's weights and the KV cache; turns scheduled chunks into logits."""

    def __init__(self, text_model, lm_head: torch.Tensor, block_manager: BlockManager, dtype: torch.dtype,
                 device: torch.device = torch.device("cpu"), *, cuda_graphs: bool = True, max_num_seqs: int = 64,
                 max_model_len: int = 32768):
        config = text_model.config
        self.device = device
        self.model = text_model.to(device)
        # Each layer's matmuls (q, k and v fused, gate and up fused) and the lm_head's, packed on a CPU
        # (services/llm/projections.py).
        self.projections, self.head = model_projections(text_model, lm_head.to(device), device)
        self.block_manager = block_manager
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim(config)
        # M-RoPE rotaries (Qwen2.5-VL, Qwen3-VL) take positions on 3 axes; plain RoPE (InternVL's LM) on one.
        self.num_position_axes = 3 if hasattr(self.model.rotary_emb, "mrope_section") else 1
        self.has_qk_norm = hasattr(text_model.layers[0].self_attn, "q_norm")
        self.scale = self.head_dim ** -0.5
        block_size = block_manager.block_size
        flash_here = flash_usable(device, dtype)
        self.flash = flash_here and block_size % FLASH_PAGE == 0
        if flash_here and not self.flash:
            log.warning("block_size %d is not a multiple of %d: flash-attn's paged kernels cannot read it, "
                        "attention falls back to SDPA", block_size, FLASH_PAGE)
        # One block past the block manager's: a scratch page that CUDA graphs' padding rows write to.
        self.num_pages = block_manager.num_blocks + 1
        num_slots = self.num_pages * block_size
        # flash-attn reads pages [pages, block_size, kv heads, head_dim]; SDPA gets the cache head-major
        # [kv heads, slots, head_dim], so a decode gathers each head's context rows into the layout its matmuls
        # take, with no second copy to transpose them.
        shape = ((len(text_model.layers), num_slots, self.num_kv_heads, self.head_dim) if self.flash
                 else (len(text_model.layers), self.num_kv_heads, num_slots, self.head_dim))
        # empty, not zeros: untouched pages cost no memory, and every slot is written before it is read.
        self.k_cache = torch.empty(shape, dtype=dtype, device=device)
        self.v_cache = torch.empty(shape, dtype=dtype, device=device)
        self.graphs = None
        if self.flash and cuda_graphs:
            self.graphs = DecodeGraphs(self, max_batch=max_num_seqs, max_blocks=-(-max_model_len // block_size),
                                       scratch_block=block_manager.num_blocks)
        log.info("attention: %s", "flash-attn, paged" + (", CUDA graphs for decode" if self.graphs else "")
                 if self.flash else "PyTorch SDPA")

    @staticmethod
    def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
        """KV cache bytes one token takes over all layers."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config) * itemsize

    def pages(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's K and V caches as flash-attn's pages [pages, block_size, kv_heads, head_dim] (views)."""
        shape = (self.num_pages, self.block_manager.block_size, self.num_kv_heads, self.head_dim)
        return self.k_cache[layer_index].view(shape), self.v_cache[layer_index].view(shape)

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Computes the chunks' tokens into the KV cache; returns logits [num_sampling_chunks, vocab]."""
        if self.graphs is not None and self.graphs.fits(chunks):
            return self.graphs.run([c.seq for c in chunks])
        batch = self._prepare(chunks).to(self.device)
        attend = self._flash_attend if self.flash else self._sdpa_attend
        hidden, deepstack = self._embed(batch.ids, chunks)
        hidden = self.forward(hidden, batch.positions, batch.slots,
                              lambda q, layer_index: attend(q, layer_index, batch), deepstack)
        last = [start + n - 1 for (start, n), c in zip(batch.spans, chunks) if c.completes_sequence]
        hidden = self.model.norm(hidden[last])
        return self.head(hidden).float().cpu()

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                attend: Attend, deepstack: DeepStack | None = None) -> torch.Tensor:
        """The decoder layers over a flat batch of tokens: writes their K/V to slots, attends with attend, and
        adds each DeepStack layer's rows at the visual tokens after its decoder layer."""
        # Both rotaries give cos/sin [1, tokens, head_dim]: M-RoPE from positions [3, 1, tokens], RoPE from [1, tokens].
        cos, sin = self.model.rotary_emb(hidden[None], positions[:, None, :] if len(positions) > 1 else positions)
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]
        for layer_index, layer in enumerate(self.model.layers):
            residual = hidden
            x = layer.input_layernorm(hidden)
            x = self._attention(layer.self_attn, layer_index, x, cos, sin, slots, attend)
            hidden = residual + x
            hidden = hidden + self._mlp(layer.mlp, layer_index, layer.post_attention_layernorm(hidden))
            if deepstack is not None and layer_index < len(deepstack.layers):
                hidden[deepstack.where] = hidden[deepstack.where] + deepstack.layers[layer_index]
        return hidden

    def _prepare(self, chunks: list[ScheduledChunk]) -> Batch:
        block_size = self.block_manager.block_size
        offsets = [0, *itertools.accumulate(c.num_new_tokens for c in chunks)]
        decodes = [(offset, c.seq) for offset, c in zip(offsets, chunks) if is_decode(c.seq, c.num_new_tokens)]
        num_tokens = offsets[-1]
        ids = torch.tensor([t for c in chunks for t in
                            c.seq.token_ids[c.seq.num_computed_tokens:c.seq.num_computed_tokens + c.num_new_tokens]])
        positions = torch.empty(self.num_position_axes, num_tokens, dtype=torch.long)
        slots = torch.empty(num_tokens, dtype=torch.long)
        prefill = []
        for offset, chunk in zip(offsets, chunks):
            seq, n = chunk.seq, chunk.num_new_tokens
            if is_decode(seq, n):
                continue
            start = seq.num_computed_tokens
            positions[:, offset:offset + n] = self._positions(seq.mm, seq.num_prompt_tokens, start, start + n)
            context = kv_slots(torch.tensor(seq.block_table), torch.arange(start + n), block_size)
            slots[offset:offset + n] = context[-n:]
            prefill.append((offset, n, context))
        rows = torch.tensor([offset for offset, _ in decodes], dtype=torch.long)
        decode_seqs = [seq for _, seq in decodes]
        index, bias = torch.zeros(len(decodes), 0, dtype=torch.long), torch.zeros(1, len(decodes), 1, 0)
        if decode_seqs:
            # Each decoding sequence computes its token at position num_computed_tokens: its slot and its
            # context (every slot up to it) come from one padded block table.
            at = torch.tensor([seq.num_computed_tokens for seq in decode_seqs])
            table = block_tables(decode_seqs)
            positions[:, rows] = at + torch.tensor([seq.mm.rope_delta for seq in decode_seqs])
            slots[rows] = table.gather(1, (at // block_size)[:, None])[:, 0] * block_size + at % block_size
            if not self.flash:
                index, bias = self._decode_context(table, at + 1)
        batch = Batch(ids, positions, slots, [(o, c.num_new_tokens) for o, c in zip(offsets, chunks)], prefill,
                      rows, index, bias)
        return self._flash_metadata(batch, chunks) if self.flash else batch

    def _decode_context(self, table: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SDPA's view of the decoding sequences: their context slots padded to the longest [B, T] (padding reads
        slot 0), and an additive mask [1, B, 1, T] that is -inf on the padding."""
        token_positions = torch.arange(int(lengths.max()))
        index = kv_slots(table, token_positions, self.block_manager.block_size)
        is_padding = token_positions[None, :] >= lengths[:, None]
        bias = torch.zeros(is_padding.shape).masked_fill_(is_padding, float("-inf"))
        return index.masked_fill_(is_padding, 0), bias[None, :, None, :]

    @staticmethod
    def _flash_metadata(batch: Batch, chunks: list[ScheduledChunk]) -> Batch:
        q_lens = [c.num_new_tokens for c in chunks]
        k_lens = [c.seq.num_computed_tokens + c.num_new_tokens for c in chunks]
        table = block_tables([c.seq for c in chunks], dtype=torch.int32)
        cumulative = lambda lens: torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)  # noqa: E731
        return dataclasses.replace(batch, cu_seqlens_q=cumulative(q_lens), cu_seqlens_k=cumulative(k_lens),
                                   max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens), block_table=table)

    @staticmethod
    def _positions(mm: MultimodalPrompt, num_prompt: int, start: int, end: int) -> torch.Tensor:
        prompt_part = mm.positions[:, start:min(end, num_prompt)]
        if end <= num_prompt:
            return prompt_part
        generated = torch.arange(max(start, num_prompt), end) + mm.rope_delta
        return torch.cat([prompt_part, generated.expand(len(prompt_part), -1)], dim=1)

    def _embed(self, ids: torch.Tensor, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, DeepStack | None]:
        """Token embeddings with the media rows of the prefill chunks spliced in, and the DeepStack rows of the
        same tokens (only those inside each chunk: a chunk boundary may cut an item)."""
        hidden = self.model.embed_tokens(ids)
        offset = 0
        where_parts, deepstack_parts = [], []
        for chunk in chunks:
            seq, n = chunk.seq, chunk.num_new_tokens
            mm: MultimodalPrompt = seq.mm
            start = seq.num_computed_tokens
            if mm.rows is not None and start < seq.num_prompt_tokens:
                rows = mm.rows[start:min(start + n, seq.num_prompt_tokens)]
                where = (rows >= 0).nonzero().squeeze(1)
                if len(where):
                    embeddings, deepstack = mm.media_rows(rows[where])
                    hidden[offset + where.to(self.device)] = embeddings.to(self.device, hidden.dtype)
                    if deepstack:
                        where_parts.append(offset + where)
                        deepstack_parts.append(deepstack)
            offset += n
        if not where_parts:
            return hidden, None
        layers = [torch.cat(parts).to(self.device, hidden.dtype) for parts in zip(*deepstack_parts)]
        return hidden, DeepStack(torch.cat(where_parts).to(self.device), layers)

    def _attention(self, attn, layer_index: int, x, cos, sin, slots: torch.Tensor, attend: Attend) -> torch.Tensor:
        n_tokens = x.shape[0]
        projections = self.projections[layer_index]
        qkv, o = projections.qkv or _separate(attn.q_proj, attn.k_proj, attn.v_proj), projections.o or attn.o_proj
        q, k, v = qkv(x)
        q = q.view(n_tokens, self.num_heads, self.head_dim)
        k = k.view(n_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(n_tokens, self.num_kv_heads, self.head_dim)
        if self.has_qk_norm:  # Qwen3: RMSNorm over each head's q and k before the rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        self._write_kv(layer_index, slots, k, v)
        return o(attend(q, layer_index).reshape(n_tokens, -1))

    def _mlp(self, mlp, layer_index: int, x: torch.Tensor) -> torch.Tensor:
        projections = self.projections[layer_index]
        if projections.gate_up is None:  # a mixture of experts
            return mlp(x)
        gate, up = projections.gate_up(x)
        return (projections.down or mlp.down_proj)(mlp.act_fn(gate) * up)

    def _write_kv(self, layer_index: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.flash:
            self.k_cache[layer_index][slots] = k
            self.v_cache[layer_index][slots] = v
        else:  # head-major: [kv heads, slots, head_dim]
            self.k_cache[layer_index].index_copy_(1, slots, k.transpose(0, 1))
            self.v_cache[layer_index].index_copy_(1, slots, v.transpose(0, 1))

    def _sdpa_attend(self, q: torch.Tensor, layer_index: int, batch: Batch) -> torch.Tensor:
        k_cache, v_cache = self.k_cache[layer_index], self.v_cache[layer_index]  # [kv heads, slots, head_dim]
        rows = batch.decode_rows
        if len(rows) == q.shape[0]:  # decodes only: their output is the whole step's, in order
            return self._decode_attend(q, k_cache, v_cache, batch)
        out = torch.empty_like(q)
        for start, n, context in batch.prefill:
            # Batched 4-D inputs: SDPA's fused CPU kernels take these; unbatched 3-D ones fell to a
            # path ~16x slower. A chunk after cached or earlier tokens uses a lower-right causal bias.
            qi = q[start:start + n].transpose(0, 1)[None]
            ki, vi = k_cache.index_select(1, context)[None], v_cache.index_select(1, context)[None]
            past = len(context) - n
            if 2 * past <= n:
                # Queries padded in front to the context's length make it plain causal: the fused kernel's fast
                # path. A short past (the text before a streamed media chunk) cost ~40% more with the bias.
                qi = torch.cat([qi.new_zeros(*qi.shape[:2], past, qi.shape[-1]), qi], 2) if past else qi
                o = F.scaled_dot_product_attention(qi, ki, vi, scale=self.scale, enable_gqa=True, is_causal=True)
                o = o[:, :, past:]
            else:
                o = F.scaled_dot_product_attention(qi, ki, vi, scale=self.scale, enable_gqa=True,
                                                   attn_mask=causal_lower_right(n, len(context)))
            out[start:start + n] = o[0].transpose(0, 1)
        if len(rows):
            out[rows] = self._decode_attend(q[rows], k_cache, v_cache, batch)
        return out

    def _decode_attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       batch: Batch) -> torch.Tensor:
        """Every decoding sequence's one query [B, heads, head_dim] at once over its context, padded to the longest.

        One gather per cache, each context row copied once into [kv heads, B, context, head_dim], then two batched
        matmuls. Not SDPA: its CPU kernel with a mask took 4-10x as long for one query per sequence in bfloat16 (and
        2x without one, at batch 8); and not a gather in the slot-major layout, whose transposes made the matmuls
        copy the context again. A lone sequence has no padding to mask: SDPA's fused kernel then takes one call
        where the matmuls take six (150 against 270-350 us a layer for `small` at 150 tokens, bfloat16).
        Query head h reads KV head h // group, as in the model.
        """
        num_seqs, context = batch.decode_index.shape
        flat = batch.decode_index.view(-1)
        kd = k_cache.index_select(1, flat).view(self.num_kv_heads, num_seqs, context, self.head_dim)
        vd = v_cache.index_select(1, flat).view(self.num_kv_heads, num_seqs, context, self.head_dim)
        if num_seqs == 1:
            out = F.scaled_dot_product_attention(q[:, :, None], kd.transpose(0, 1), vd.transpose(0, 1),
                                                 scale=self.scale, enable_gqa=True)
            return out[:, :, 0]
        qd = q.view(num_seqs, self.num_kv_heads, -1, self.head_dim).transpose(0, 1)  # [kv heads, B, group, D]
        scores = torch.matmul(qd, kd.transpose(-1, -2)).float().mul_(self.scale).add_(batch.decode_bias)
        out = torch.matmul(scores.softmax(-1).to(q.dtype), vd)  # [kv heads, B, group, D]
        return out.transpose(0, 1).reshape(num_seqs, self.num_heads, self.head_dim)

    def _flash_attend(self, q: torch.Tensor, layer_index: int, batch: Batch) -> torch.Tensor:
        # Prefill chunks and decodes in one varlen call; causal aligns each chunk's queries to the end of
        # its context, so a chunk after cached tokens sees them all. GQA is native.
        from flash_attn import flash_attn_varlen_func

        k_pages, v_pages = self.pages(layer_index)
        return flash_attn_varlen_func(q, k_pages, v_pages, batch.cu_seqlens_q, batch.cu_seqlens_k,
                                      batch.max_seqlen_q, batch.max_seqlen_k, softmax_scale=self.scale,
                                      causal=True, block_table=batch.block_table)


def _separate(*linears) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    return lambda x: tuple(linear(x) for linear in linears)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
