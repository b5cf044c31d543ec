"""Runs one engine step on the language model: varlen batch, paged KV cache, SDPA attention."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

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


class ModelRunner:
    """Holds the language model's weights and the KV cache; turns scheduled chunks into logits."""

    def __init__(self, text_model, lm_head: torch.Tensor, block_manager: BlockManager, dtype: torch.dtype):
        config = text_model.config
        self.model = text_model
        self.lm_head = lm_head
        self.block_manager = block_manager
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim ** -0.5
        num_slots = block_manager.num_blocks * block_manager.block_size
        shape = (len(text_model.layers), num_slots, self.num_kv_heads, self.head_dim)
        # empty, not zeros: untouched pages cost no memory, and every slot is written before it is read.
        self.k_cache = torch.empty(shape, dtype=dtype)
        self.v_cache = torch.empty(shape, dtype=dtype)

    @staticmethod
    def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
        """KV cache bytes one token takes over all layers."""
        head_dim = config.hidden_size // config.num_attention_heads
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Computes the chunks' tokens into the KV cache; returns logits [num_sampling_chunks, vocab]."""
        batch = self._prepare(chunks)
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
        return (hidden @ self.lm_head.T).float()

    def _prepare(self, chunks: list[ScheduledChunk]) -> _Batch:
        block_size = self.block_manager.block_size
        ids, positions, slots, spans, contexts = [], [], [], [], []
        offset = 0
        for chunk in chunks:
            seq, n = chunk.seq, chunk.num_new_tokens
            start = seq.num_computed_tokens
            ids += seq.token_ids[start:start + n]
            positions.append(self._positions(seq.mm, seq.num_prompt_tokens, start, start + n))
            token_positions = torch.arange(start + n)
            context = torch.tensor(seq.block_table)[token_positions // block_size] * block_size \
                + token_positions % block_size
            slots.append(context[start:])
            spans.append((offset, n))
            contexts.append(context)
            offset += n
        decode = [i for i, (_, n) in enumerate(spans) if n == 1]
        prefill = [(spans[i][0], spans[i][1], contexts[i]) for i, (_, n) in enumerate(spans) if n > 1]
        decode_rows = torch.tensor([spans[i][0] for i in decode], dtype=torch.long)
        longest = max((len(contexts[i]) for i in decode), default=0)
        decode_index = torch.zeros(len(decode), longest, dtype=torch.long)
        decode_mask = torch.zeros(len(decode), 1, 1, longest, dtype=torch.bool)
        for row, i in enumerate(decode):
            decode_index[row, :len(contexts[i])] = contexts[i]
            decode_mask[row, ..., :len(contexts[i])] = True
        return _Batch(torch.tensor(ids), torch.cat(positions, dim=1), torch.cat(slots), spans, prefill,
                      decode_rows, decode_index, decode_mask)

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
                hidden[offset + where] = mm.embeddings[rows[where]].to(hidden.dtype)
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
        groups = self.num_heads // self.num_kv_heads
        for start, n, context in batch.prefill:
            qi = q[start:start + n].transpose(0, 1)
            ki = k_cache[context].transpose(0, 1).repeat_interleave(groups, dim=0)
            vi = v_cache[context].transpose(0, 1).repeat_interleave(groups, dim=0)
            past = len(context) - n
            if past == 0:
                o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=self.scale)
            else:
                mask = torch.ones(n, len(context), dtype=torch.bool).tril(diagonal=past)
                o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=self.scale)
            out[start:start + n] = o.transpose(0, 1)
        if len(batch.decode_rows):
            # Every decoding sequence in one call: contexts padded to the longest, padding masked out.
            qd = q[batch.decode_rows][:, :, None, :]  # [B, H, 1, D]
            kd = k_cache[batch.decode_index].permute(0, 2, 1, 3).repeat_interleave(groups, dim=1)
            vd = v_cache[batch.decode_index].permute(0, 2, 1, 3).repeat_interleave(groups, dim=1)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=batch.decode_mask, scale=self.scale)
            out[batch.decode_rows] = o[:, :, 0, :]
        return attn.o_proj(out.reshape(n_tokens, -1))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
