"""Runs one engine step on the language model: varlen batch, paged KV cache, SDPA attention."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from services.llm.block_manager import BlockManager
from services.llm.prompt import MultimodalPrompt
from services.llm.scheduler import ScheduledChunk


@dataclasses.dataclass(frozen=True)
class _Batch:
    """One step's flattened tokens and where each sequence's attention reads its context from."""

    ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [3, num_tokens] M-RoPE positions
    slots: torch.Tensor  # [num_tokens] KV slots written this step
    spans: list[tuple[int, int]]  # (offset, num_new_tokens) per chunk
    prefill: list[tuple[int, int, torch.Tensor]]  # (offset, n, context slots) for chunks of n > 1
    decode_rows: torch.Tensor  # [B] token offset of each single-token chunk
    decode_index: torch.Tensor  # [B, longest context] context slots, zero-padded
    decode_mask: torch.Tensor  # [B, 1, 1, longest context] True where the slot is real

    def to(self, device: torch.device) -> _Batch:
        """The same batch with every tensor on device (built on the CPU, moved in one go)."""
        if device.type == "cpu":
            return self
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return _Batch(move(self.ids), move(self.positions), move(self.slots), self.spans,
                      [(start, n, move(context)) for start, n, context in self.prefill],
                      move(self.decode_rows), move(self.decode_index), move(self.decode_mask))


class ModelRunner:
    """Holds the language model's weights and the KV cache; turns scheduled chunks into logits."""

    def __init__(self, text_model, lm_head: torch.Tensor, block_manager: BlockManager, dtype: torch.dtype,
                 device: torch.device = torch.device("cpu")):
        config = text_model.config
        self.device = device
        self.model = text_model.to(device)
        self.lm_head = lm_head.to(device)
        self.block_manager = block_manager
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim ** -0.5
        num_slots = block_manager.num_blocks * block_manager.block_size
        shape = (len(text_model.layers), num_slots, self.num_kv_heads, self.head_dim)
        # empty, not zeros: untouched pages cost no memory, and every slot is written before it is read.
        self.k_cache = torch.empty(shape, dtype=dtype, device=device)
        self.v_cache = torch.empty(shape, dtype=dtype, device=device)

    @staticmethod
    def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
        """KV cache bytes one token takes over all layers."""
        head_dim = config.hidden_size // config.num_attention_heads
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Computes the chunks' tokens into the KV cache; returns logits [num_sampling_chunks, vocab]."""
        batch = self._prepare(chunks).to(self.device)
        hidden = self._embed(batch.ids, chunks)
        cos, sin = self.model.rotary_emb(hidden[None], batch.positions[:, None, :])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]
        for layer_index, layer in enumerate(self.model.layers):
            residual = hidden
            x = layer.input_layernorm(hidden)
            x = self._attention(layer.self_attn, layer_index, x, cos, sin, batch)
            hidden = residual + x
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        last = [start + n - 1 for (start, n), c in zip(batch.spans, chunks) if c.completes_sequence]
        hidden = self.model.norm(hidden[last])
        return (hidden @ self.lm_head.T).float().cpu()

    def _prepare(self, chunks: list[ScheduledChunk]) -> _Batch:
        block_size = self.block_manager.block_size
        ids, positions, slots, spans, prefill = [], [], [], [], []
        decode_seqs, decode_rows = [], []
        offset = 0
        for chunk in chunks:
            seq, n = chunk.seq, chunk.num_new_tokens
            start = seq.num_computed_tokens
            ids += seq.token_ids[start:start + n]
            spans.append((offset, n))
            if n == 1 and start >= seq.num_prompt_tokens:
                decode_seqs.append(seq)
                decode_rows.append(offset)
            else:
                positions.append(self._positions(seq.mm, seq.num_prompt_tokens, start, start + n))
                token_positions = torch.arange(start + n)
                context = torch.tensor(seq.block_table)[token_positions // block_size] * block_size \
                    + token_positions % block_size
                slots.append(context[start:])
                prefill.append((offset, n, context))
            offset += n
        # Decodes are prepared together: one padded block-table tensor instead of per-sequence ops.
        decode_index = torch.zeros(len(decode_seqs), 0, dtype=torch.long)
        decode_mask = torch.zeros(len(decode_seqs), 1, 1, 0, dtype=torch.bool)
        if decode_seqs:
            lengths = torch.tensor([s.num_computed_tokens + 1 for s in decode_seqs])
            width = max(len(s.block_table) for s in decode_seqs)
            tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in decode_seqs])
            token_positions = torch.arange(int(lengths.max()))
            decode_index = tables[:, token_positions // block_size] * block_size + token_positions % block_size
            decode_mask = (token_positions[None, :] < lengths[:, None])[:, None, None, :]
            decode_index = decode_index.masked_fill(~decode_mask[:, 0, 0, :], 0)
            last = lengths - 1
            deltas = torch.tensor([s.mm.rope_delta for s in decode_seqs])
            decode_positions = (last + deltas).expand(3, -1)
            decode_slots = decode_index.gather(1, last[:, None])[:, 0]
        rows = torch.tensor(decode_rows, dtype=torch.long)
        all_positions = torch.empty(3, offset, dtype=torch.long)
        all_slots = torch.empty(offset, dtype=torch.long)
        if decode_seqs:
            all_positions[:, rows] = decode_positions
            all_slots[rows] = decode_slots
        for (start, n, _), pos, slot in zip(prefill, positions, slots):
            all_positions[:, start:start + n] = pos
            all_slots[start:start + n] = slot
        return _Batch(torch.tensor(ids), all_positions, all_slots, spans, prefill, rows, decode_index, decode_mask)

    @staticmethod
    def _positions(mm: MultimodalPrompt, num_prompt: int, start: int, end: int) -> torch.Tensor:
        prompt_part = mm.positions[:, start:min(end, num_prompt)]
        if end <= num_prompt:
            return prompt_part
        generated = torch.arange(max(start, num_prompt), end) + mm.rope_delta
        return torch.cat([prompt_part, generated.expand(3, -1)], dim=1)

    def _embed(self, ids: torch.Tensor, chunks: list[ScheduledChunk]) -> torch.Tensor:
        hidden = self.model.embed_tokens(ids)
        offset = 0
        for chunk in chunks:
            seq, n = chunk.seq, chunk.num_new_tokens
            mm: MultimodalPrompt = seq.mm
            start = seq.num_computed_tokens
            if mm.embeddings is not None and start < seq.num_prompt_tokens:
                rows = mm.rows[start:min(start + n, seq.num_prompt_tokens)]
                where = (rows >= 0).nonzero().squeeze(1)
                hidden[offset + where.to(self.device)] = mm.embeddings[rows[where]].to(self.device, hidden.dtype)
            offset += n
        return hidden

    def _attention(self, attn, layer_index, x, cos, sin, batch: _Batch) -> torch.Tensor:
        n_tokens = x.shape[0]
        q = attn.q_proj(x).view(n_tokens, self.num_heads, self.head_dim)
        k = attn.k_proj(x).view(n_tokens, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(x).view(n_tokens, self.num_kv_heads, self.head_dim)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k_cache, v_cache = self.k_cache[layer_index], self.v_cache[layer_index]
        k_cache[batch.slots] = k
        v_cache[batch.slots] = v
        out = torch.empty_like(q)
        for start, n, context in batch.prefill:
            # Batched 4-D inputs: SDPA's fused CPU kernels take these; unbatched 3-D ones fell to a
            # path ~16x slower. A chunk after cached or earlier tokens uses a lower-right causal bias.
            qi = q[start:start + n].transpose(0, 1)[None]
            ki, vi = k_cache[context].transpose(0, 1)[None], v_cache[context].transpose(0, 1)[None]
            past = len(context) - n
            causal = {"is_causal": True} if past == 0 else {"attn_mask": causal_lower_right(n, len(context))}
            o = F.scaled_dot_product_attention(qi, ki, vi, scale=self.scale, enable_gqa=True, **causal)
            out[start:start + n] = o[0].transpose(0, 1)
        if len(batch.decode_rows):
            # Every decoding sequence in one call: contexts padded to the longest, padding masked out.
            qd = q[batch.decode_rows][:, :, None, :]  # [B, H, 1, D]
            kd = k_cache[batch.decode_index].permute(0, 2, 1, 3)
            vd = v_cache[batch.decode_index].permute(0, 2, 1, 3)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=batch.decode_mask, scale=self.scale,
                                               enable_gqa=True)
            out[batch.decode_rows] = o[:, :, 0, :]
        return attn.o_proj(out.reshape(n_tokens, -1))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
