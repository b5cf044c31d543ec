"""Runs one engine step on the language model: varlen batch, paged KV cache, SDPA attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.llm.block_manager import BlockManager
from services.llm.prompt import MultimodalPrompt
from services.llm.scheduler import ScheduledChunk


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
        ids, positions, slots, spans = self._prepare(chunks)
        hidden = self._embed(ids, chunks)
        cos, sin = self.model.rotary_emb(hidden[None], positions[:, None, :])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]
        for layer_index, layer in enumerate(self.model.layers):
            residual = hidden
            x = layer.input_layernorm(hidden)
            x = self._attention(layer.self_attn, layer_index, x, cos, sin, slots, spans)
            hidden = residual + x
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        last = [start + n - 1 for (start, n, _), c in zip(spans, chunks) if c.completes_sequence]
        hidden = self.model.norm(hidden[last])
        return (hidden @ self.lm_head.T).float()

    def _prepare(self, chunks):
        ids, positions, slots, spans = [], [], [], []
        offset = 0
        for chunk in chunks:
            seq, n = chunk.seq, chunk.num_new_tokens
            start = seq.num_computed_tokens
            ids += seq.token_ids[start:start + n]
            positions.append(self._positions(seq.mm, seq.num_prompt_tokens, start, start + n))
            slots += [self.block_manager.slot(seq, p) for p in range(start, start + n)]
            context = torch.tensor([self.block_manager.slot(seq, p) for p in range(start + n)])
            spans.append((offset, n, context))
            offset += n
        return torch.tensor(ids), torch.cat(positions, dim=1), torch.tensor(slots), spans

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

    def _attention(self, attn, layer_index, x, cos, sin, slots, spans) -> torch.Tensor:
        n_tokens = x.shape[0]
        q = attn.q_proj(x).view(n_tokens, self.num_heads, self.head_dim)
        k = attn.k_proj(x).view(n_tokens, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(x).view(n_tokens, self.num_kv_heads, self.head_dim)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k_cache, v_cache = self.k_cache[layer_index], self.v_cache[layer_index]
        k_cache[slots] = k
        v_cache[slots] = v
        out = torch.empty_like(q)
        groups = self.num_heads // self.num_kv_heads
        for start, n, context in spans:
            qi = q[start:start + n].transpose(0, 1)
            ki = k_cache[context].transpose(0, 1).repeat_interleave(groups, dim=0)
            vi = v_cache[context].transpose(0, 1).repeat_interleave(groups, dim=0)
            past = len(context) - n
            if past == 0:
                o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=n > 1, scale=self.scale)
            elif n == 1:
                o = F.scaled_dot_product_attention(qi, ki, vi, scale=self.scale)
            else:
                mask = torch.ones(n, len(context), dtype=torch.bool).tril(diagonal=past)
                o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=self.scale)
            out[start:start + n] = o.transpose(0, 1)
        return attn.o_proj(out.reshape(n_tokens, -1))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
