"""One engine step's batch as the model runner feeds it to attention, and the helpers that build it."""

from __future__ import annotations

import dataclasses

import torch

from services.llm.sequence import Sequence


def is_decode(seq: Sequence, num_new_tokens: int) -> bool:
    """Whether a chunk computes one generated token (a decode) rather than prompt tokens (a prefill)."""
    return num_new_tokens == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens


def block_tables(seqs: list[Sequence], width: int = 0, fill: int = 0, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """The sequences' block tables as one tensor [len(seqs), width or the longest], padded with fill."""
    width = width or max(len(s.block_table) for s in seqs)
    return torch.tensor([s.block_table + [fill] * (width - len(s.block_table)) for s in seqs], dtype=dtype)


@dataclasses.dataclass(frozen=True)
class Batch:
    """One step's flattened tokens and where each sequence's attention reads its context from."""

    ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [axes, num_tokens]: 3 for M-RoPE, 1 for plain RoPE
    slots: torch.Tensor  # [num_tokens] KV slots written this step
    spans: list[tuple[int, int]]  # (offset, num_new_tokens) per chunk
    # SDPA: each multi-token chunk on its own, the single-token ones together.
    prefill: list[tuple[int, int, torch.Tensor]]  # (offset, n, context slots) for chunks of n > 1
    decode_rows: torch.Tensor  # [B] token offset of each single-token chunk
    decode_index: torch.Tensor  # [B, longest context] context slots, zero-padded
    decode_bias: torch.Tensor  # [1, B, 1, longest context] float32: 0 where the slot is real, -inf on padding
    # flash-attn: every chunk in one varlen call over the KV pages.
    cu_seqlens_q: torch.Tensor | None = None  # [chunks + 1] int32
    cu_seqlens_k: torch.Tensor | None = None  # [chunks + 1] int32, context lengths
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    block_table: torch.Tensor | None = None  # [chunks, most blocks] int32

    def to(self, device: torch.device) -> Batch:
        """The same batch with every tensor on device (built on the CPU, moved in one go)."""
        if device.type == "cpu":
            return self
        move = lambda t: t if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return dataclasses.replace(
            self, ids=move(self.ids), positions=move(self.positions), slots=move(self.slots),
            prefill=[(start, n, move(context)) for start, n, context in self.prefill],
            decode_rows=move(self.decode_rows), decode_index=move(self.decode_index),
            decode_bias=move(self.decode_bias), cu_seqlens_q=move(self.cu_seqlens_q),
            cu_seqlens_k=move(self.cu_seqlens_k), block_table=move(self.block_table))
