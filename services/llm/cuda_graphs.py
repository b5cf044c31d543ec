"""flash-attn's paged kernels and CUDA graphs of decode steps: the llm's GPU path, chosen by capability."""

from __future__ import annotations

import importlib.util

import torch

from services.llm.batch import block_tables, is_decode
from services.llm.sequence import Sequence

# flash-attn's paged kernels read the KV cache in pages of a multiple of 256 tokens.
FLASH_PAGE = 256
DEFAULT_BLOCK_SIZE = 16  # elsewhere: fine-grained prefix caching


def flash_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether flash-attn runs here: an NVIDIA GPU, the package installed, half-precision weights."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and importlib.util.find_spec("flash_attn") is not None)


def default_block_size(device: torch.device, dtype: torch.dtype) -> int:
    return FLASH_PAGE if flash_usable(device, dtype) else DEFAULT_BLOCK_SIZE


class DecodeGraphs:
    """Decode-only steps replayed from CUDA graphs captured at start-up, one per padded batch size.

    A decode step launches a few hundred small kernels, and at small batches their launch cost, not the
    GPU, bounds it; a graph replays them all at once. A batch is padded up to the next captured size: the
    padding rows write their K/V into a scratch block that no sequence owns and attend only to it. Inputs
    live in static buffers the graphs read; a step copies its own into them and replays.
    """

    def __init__(self, runner, max_batch: int, max_blocks: int, scratch_block: int):
        from flash_attn import flash_attn_with_kvcache

        self._attend_kernel = flash_attn_with_kvcache
        self.runner = runner
        self.block_size = runner.block_manager.block_size
        self.max_blocks = max_blocks
        self.scratch_block = scratch_block
        self.sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
        n, device = self.sizes[-1], runner.device
        self.ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(runner.num_position_axes, n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), scratch_block * self.block_size, dtype=torch.long, device=device)
        self.block_table = torch.full((n, max_blocks), scratch_block, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture()

    @torch.inference_mode()
    def _capture(self) -> None:
        # Warm-up off the capture (lazy initialisation, allocator), on a side stream as CUDA graphs want.
        side = torch.cuda.Stream(self.runner.device)
        side.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(self.sizes[-1])
        torch.cuda.current_stream(self.runner.device).wait_stream(side)
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller ones reuse its memory pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.runner.device)

    def _forward(self, size: int) -> torch.Tensor:
        runner = self.runner
        lens, table = self.context_lens[:size], self.block_table[:size]

        def attend(q: torch.Tensor, layer_index: int) -> torch.Tensor:
            k_pages, v_pages = runner.pages(layer_index)
            return self._attend_kernel(q[:, None], k_pages, v_pages, cache_seqlens=lens, block_table=table,
                                       softmax_scale=runner.scale, causal=True)[:, 0]

        hidden = runner.model.embed_tokens(self.ids[:size])
        # A decode has no visual rows: no DeepStack injection, so the graph is the same for every family.
        hidden = runner.forward(hidden, self.positions[:, :size], self.slots[:size], attend)
        return runner.head(runner.model.norm(hidden))

    def fits(self, chunks) -> bool:
        return len(chunks) <= self.sizes[-1] and all(is_decode(c.seq, c.num_new_tokens) for c in chunks)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits [len(seqs), vocab] (float32, on the CPU) of one decode token per sequence."""
        n = len(seqs)
        size = next(s for s in self.sizes if s >= n)
        block_manager = self.runner.block_manager
        at = [s.num_computed_tokens for s in seqs]  # the position each sequence computes now
        pad = size - n
        ids = [s.token_ids[i] for s, i in zip(seqs, at)] + [0] * pad
        positions = [i + s.mm.rope_delta for s, i in zip(seqs, at)] + [0] * pad
        slots = [block_manager.slot(s, i) for s, i in zip(seqs, at)] + [self.scratch_block * self.block_size] * pad
        self.ids[:size].copy_(torch.tensor(ids))
        self.positions[:, :size].copy_(torch.tensor(positions).expand(len(self.positions), -1))
        self.slots[:size].copy_(torch.tensor(slots))
        self.context_lens[:size].copy_(torch.tensor([i + 1 for i in at] + [1] * pad, dtype=torch.int32))
        self.block_table[:n].copy_(block_tables(seqs, self.max_blocks, self.scratch_block, torch.int32))
        self.block_table[n:size].fill_(self.scratch_block)
        self.graphs[size].replay()
        return self.logits[size][:n].float().cpu()
