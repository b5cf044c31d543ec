"""What flash-attn's varlen call is given over the KV pages (its kernels need a GPU; the metadata does not)."""

import torch

from services.llm.batch import Batch, block_tables
from services.llm.block_manager import kv_slots
from services.llm.cuda_graphs import default_block_size, flash_usable
from services.llm.runner import ModelRunner
from services.llm.scheduler import ScheduledChunk
from services.llm.sequence import SamplingOptions, Sequence


def test_varlen_metadata_covers_chunks_after_cached_tokens_and_decodes():
    # 8 prompt tokens after 32 already in the cache (pages 7, 3), then one decoding sequence (page 5).
    chunked = Sequence("a", list(range(40)), SamplingOptions(), num_computed_tokens=32, block_table=[7, 3])
    decoding = Sequence("b", list(range(11)), SamplingOptions(), num_prompt_tokens=10, num_computed_tokens=10,
                        block_table=[5])
    empty = torch.empty(0)
    batch = ModelRunner._flash_metadata(Batch(empty, empty, empty, [], [], empty, empty, empty),
                                        [ScheduledChunk(chunked, 8), ScheduledChunk(decoding, 1)])
    assert batch.cu_seqlens_q.tolist() == [0, 8, 9] and batch.cu_seqlens_q.dtype == torch.int32
    assert batch.cu_seqlens_k.tolist() == [0, 40, 51] and batch.cu_seqlens_k.dtype == torch.int32
    assert (batch.max_seqlen_q, batch.max_seqlen_k) == (8, 40)
    assert batch.block_table.tolist() == [[7, 3], [5, 0]] and batch.block_table.dtype == torch.int32


def test_flash_only_on_a_gpu_in_half_precision():
    cpu = torch.device("cpu")
    assert not flash_usable(cpu, torch.bfloat16) and default_block_size(cpu, torch.bfloat16) == 16
    assert not flash_usable(torch.device("cuda"), torch.float32)  # flash-attn has no float32 kernels


def test_kv_slots_agree_for_one_position_one_table_and_padded_tables():
    tables = [[7, 3], [5]]
    one_by_one = [[kv_slots(t, p, 16) for p in range(16 * len(t))] for t in tables]
    assert one_by_one[0][15:18] == [127, 48, 49]  # the end of block 7, then block 3
    assert kv_slots(torch.tensor(tables[0]), torch.arange(32), 16).tolist() == one_by_one[0]
    padded = kv_slots(block_tables([Sequence(str(i), [0], SamplingOptions(), block_table=t)
                                    for i, t in enumerate(tables)]), torch.arange(32), 16)
    assert padded[0].tolist() == one_by_one[0] and padded[1, :16].tolist() == one_by_one[1]
