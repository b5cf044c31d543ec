"""What flash-attn's varlen call is given over the KV pages (its kernels need a GPU; the metadata does not)."""

import torch

from services.llm.cuda_graphs import default_block_size, flash_usable
from services.llm.runner import ModelRunner, _Batch
from services.llm.scheduler import ScheduledChunk
from services.llm.sequence import SamplingOptions, Sequence


def test_varlen_metadata_covers_chunks_after_cached_tokens_and_decodes():
    # 8 prompt tokens after 32 already in the cache (pages 7, 3), then one decoding sequence (page 5).
    chunked = Sequence("a", list(range(40)), SamplingOptions(), num_computed_tokens=32, block_table=[7, 3])
    decoding = Sequence("b", list(range(11)), SamplingOptions(), num_prompt_tokens=10, num_computed_tokens=10,
                        block_table=[5])
    empty = torch.empty(0)
    batch = ModelRunner._flash_metadata(_Batch(empty, empty, empty, [], [], empty, empty, empty),
                                        [ScheduledChunk(chunked, 8), ScheduledChunk(decoding, 1)])
    assert batch.cu_seqlens_q.tolist() == [0, 8, 9] and batch.cu_seqlens_q.dtype == torch.int32
    assert batch.cu_seqlens_k.tolist() == [0, 40, 51] and batch.cu_seqlens_k.dtype == torch.int32
    assert (batch.max_seqlen_q, batch.max_seqlen_k) == (8, 40)
    assert batch.block_table.tolist() == [[7, 3], [5, 0]] and batch.block_table.dtype == torch.int32


def test_flash_only_on_a_gpu_in_half_precision():
    cpu = torch.device("cpu")
    assert not flash_usable(cpu, torch.bfloat16) and default_block_size(cpu, torch.bfloat16) == 16
    assert not flash_usable(torch.device("cuda"), torch.float32)  # flash-attn has no float32 kernels
