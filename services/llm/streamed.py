"""A streamed prompt's media rows: planned up front, arriving chunk by chunk in any order, freed once prefilled."""

from __future__ import annotations

import bisect
import itertools

import torch

from mmserve.models.family import EncodedItem


class ChunkedMedia:
    """The media rows of one prompt, in prompt order, as the chunks of each item's plan.

    The plan (which rows each chunk brings, where each row sits in the prompt) is fixed at construction and read
    from any thread; the chunks themselves are put, read and freed by the engine thread only. Prefill reads a
    chunk's rows once, so a chunk is freed as soon as the prompt is computed past its last row: the sequence holds
    only the chunks that arrived and are not yet prefilled.
    """

    def __init__(self, chunk_rows: list[tuple[int, ...]], positions: list[int], width: int):
        self.width = width  # columns of a packed chunk: hidden size * (1 + DeepStack layers)
        self.num_items = len(chunk_rows)
        self.positions = positions  # prompt position of each media row, in order
        self.index = {(m, c): i for i, (m, c) in enumerate(
            (m, c) for m, rows in enumerate(chunk_rows) for c in range(len(rows)))}
        self.rows = [n for rows in chunk_rows for n in rows]
        self.starts = [0, *itertools.accumulate(self.rows)]  # first media row of each chunk; the total last
        self.chunks: list[EncodedItem | None] = [None] * len(self.rows)

    @property
    def num_chunks(self) -> int:
        return len(self.rows)

    @property
    def num_held_chunks(self) -> int:
        return sum(chunk is not None for chunk in self.chunks)

    def token_span(self, index: int) -> tuple[int, int]:
        """The prompt tokens [start, end) chunk index fills."""
        return self.positions[self.starts[index]], self.positions[self.starts[index + 1] - 1] + 1

    def locate(self, media_index: int, chunk_index: int, shape: list[int]) -> int:
        """The chunk's index in prompt order; ValueError naming the field where it does not fit the plan."""
        if media_index >= self.num_items:
            raise ValueError(f"chunk.media_index: {media_index} is not one of the request's media items")
        index = self.index.get((media_index, chunk_index))
        if index is None:
            raise ValueError(f"chunk.chunk_index: media item {media_index} was planned in fewer than "
                             f"{chunk_index + 1} chunks")
        if shape != [self.rows[index], self.width]:
            raise ValueError(f"chunk.embeddings: shape {shape} of chunk {chunk_index} of media item {media_index} "
                             f"is not the planned [{self.rows[index]}, {self.width}]")
        return index

    def put(self, index: int, chunk: EncodedItem, num_computed_tokens: int) -> None:
        """Holds an arrived chunk, unless the prompt is already computed past it (a prefix-cache hit)."""
        self.chunks[index] = chunk
        self.free_consumed(num_computed_tokens)

    def free_consumed(self, num_computed_tokens: int) -> None:
        """Frees every chunk whose rows all sit before num_computed_tokens (prefill has read them)."""
        num_consumed_rows = bisect.bisect_left(self.positions, num_computed_tokens)
        for index in range(bisect.bisect_right(self.starts, num_consumed_rows) - 1):
            self.chunks[index] = None

    def clear(self) -> None:
        """Frees every chunk (the sequence ended)."""
        self.chunks = [None] * len(self.rows)

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The embeddings and DeepStack rows of media rows (a contiguous ascending range, all arrived)."""
        first, stop = int(rows[0]), int(rows[-1]) + 1
        assert stop - first == len(rows), "a prefill chunk's media rows are contiguous"
        parts = []
        for index in range(bisect.bisect_right(self.starts, first) - 1, bisect.bisect_left(self.starts, stop)):
            chunk, start = self.chunks[index], self.starts[index]
            assert chunk is not None, "prefill ran into a media chunk that has not arrived"
            parts.append(chunk.rows(max(first, start) - start, min(stop, self.starts[index + 1]) - start))
        embeddings = torch.cat([p.embeddings for p in parts])
        return embeddings, [torch.cat(layer) for layer in zip(*(p.deepstack for p in parts))]
