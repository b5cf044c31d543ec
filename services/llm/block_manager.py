"""Paged KV cache bookkeeping: ref-counted fixed-size blocks with prefix caching (plain Python, no torch)."""

from __future__ import annotations

import array
import collections
import hashlib

from services.llm.sequence import Sequence


def block_hash(previous: bytes, token_ids: list[int], media: list[tuple[int, int, str]]) -> bytes:
    """Identity of a full block: the chain before it, its tokens, and which media rows fill its placeholders."""
    h = hashlib.blake2b(previous, digest_size=16)
    h.update(array.array("q", token_ids).tobytes())
    for start, end, digest in media:
        h.update(f"|{start}:{end}:{digest}".encode())
    return h.digest()


def kv_slots(block_table, positions, block_size):
    """Where tokens live in the flat KV cache: the first slot of the block holding each position, plus its offset.

    One position (an int) in a list block_table gives an int; positions as a tensor [P] in a tensor block_table
    [..., blocks] (one table, or several padded into rows) give slots [..., P].
    """
    index = positions // block_size
    blocks = block_table[index] if isinstance(positions, int) else block_table[..., index]
    return blocks * block_size + positions % block_size


class BlockManager:
    """Owns the KV blocks. A full, computed block is remembered by its hash so that a later sequence with
    the same prefix (a shared system prompt, the same video at the same place) reuses it instead of
    recomputing; a freed block keeps its hash until the block is handed out again. prefix_caching False: no
    block is remembered, every prompt is computed whole."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("block manager: need at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        # Free blocks are handed out oldest-freed first, so recently freed (hashed) blocks stay reusable
        # longest. A cached block reused from the middle leaves a stale queue entry, skipped later:
        # O(1) either way, where removing from the middle of the queue was O(blocks).
        self.free_block_ids: set[int] = set(range(num_blocks))
        self._free_order: collections.deque[int] = collections.deque(range(num_blocks))

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
        """Grows seq's block table with fresh blocks to hold num_tokens tokens."""
        needed = self.num_blocks_for(num_tokens) - len(seq.block_table)
        if needed > self.num_free_blocks:
            raise MemoryError(f"KV cache: {needed} blocks needed, {self.num_free_blocks} free")
        for _ in range(needed):
            block = self._free_order.popleft()
            while block not in self.free_block_ids:
                block = self._free_order.popleft()
            self.free_block_ids.remove(block)
            old = self.block_hashes[block]
            if old is not None and self.hash_to_block.get(old) == block:
                del self.hash_to_block[old]  # its contents are about to be overwritten
            self.block_hashes[block] = None
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def allocate_cached_prefix(self, seq: Sequence) -> int:
        """Maps the longest cached prefix of a sequence that holds no blocks; returns its length in tokens."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        # At least one token is always computed, so the step that finishes the prompt yields logits.
        max_blocks = (seq.num_tokens - 1) // self.block_size
        previous = b""
        for index in range(max_blocks):
            h = self._hash_of(seq, index, previous)
            block = self.hash_to_block.get(h)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                self.free_block_ids.remove(block)
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            previous = h
        return len(seq.block_table) * self.block_size

    def register_computed(self, seq: Sequence) -> None:
        """Remembers seq's blocks that became full and computed, so later sequences can share them."""
        if not self.prefix_caching:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        for index in range(len(seq.block_hashes), full):
            previous = seq.block_hashes[-1] if seq.block_hashes else b""
            h = self._hash_of(seq, index, previous)
            seq.block_hashes.append(h)
            block = seq.block_table[index]
            self.block_hashes[block] = h
            self.hash_to_block.setdefault(h, block)

    def free(self, seq: Sequence) -> None:
        """Drops seq's references; blocks nobody holds go back to the free list with their hashes."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_block_ids.add(block)
                self._free_order.append(block)
        seq.block_table.clear()
        seq.block_hashes.clear()

    def slot(self, seq: Sequence, position: int) -> int:
        """The flat KV slot of seq's token at position."""
        return kv_slots(seq.block_table, position, self.block_size)

    def _hash_of(self, seq: Sequence, index: int, previous: bytes) -> bytes:
        start, end = index * self.block_size, (index + 1) * self.block_size
        media = [(max(s, start) - s, min(e, end) - s, digest) for s, e, digest in seq.media_spans
                 if s < end and e > start]
        return block_hash(previous, seq.token_ids[start:end], media)
