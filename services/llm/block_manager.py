"""Paged KV cache bookkeeping: fixed-size blocks handed to sequences (plain Python, no torch)."""

from __future__ import annotations

import collections

from services.llm.sequence import Sequence


class BlockManager:
    """Owns the free list of KV blocks; a sequence's block_table maps its token positions to blocks."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("block manager: need at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_block_ids: collections.deque[int] = collections.deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether seq can grow to hold num_tokens tokens."""
        return self.num_blocks_for(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grows seq's block table to hold num_tokens tokens."""
        needed = self.num_blocks_for(num_tokens) - len(seq.block_table)
        if needed > self.num_free_blocks:
            raise MemoryError(f"KV cache: {needed} blocks needed, {self.num_free_blocks} free")
        for _ in range(needed):
            seq.block_table.append(self.free_block_ids.popleft())

    def free(self, seq: Sequence) -> None:
        """Returns all of seq's blocks."""
        self.free_block_ids.extend(seq.block_table)
        seq.block_table.clear()

    def slot(self, seq: Sequence, position: int) -> int:
        """The flat KV slot of seq's token at position."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
