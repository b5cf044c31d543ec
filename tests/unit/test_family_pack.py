"""The wire and cache form of an encoded item: DeepStack features travel as column blocks beside the embeddings."""

import pytest
import torch

from mmserve.models.family import EncodedItem, pack, unpack


def test_pack_round_trips_deepstack_and_keeps_rows():
    item = EncodedItem(torch.randn(6, 4), (torch.randn(6, 4), torch.randn(6, 4)))
    packed = pack(item)
    assert packed.shape == (6, 12)
    # A video's chunks are cut by rows: unpacking a row range equals the item's own rows.
    back = unpack(packed[2:5], 4)
    assert torch.equal(back.embeddings, item.embeddings[2:5])
    assert [d.tolist() for d in back.deepstack] == [d[2:5].tolist() for d in item.deepstack]


def test_pack_without_deepstack_is_the_embeddings_and_a_bad_width_is_refused():
    item = EncodedItem(torch.randn(3, 4))
    assert pack(item) is item.embeddings and unpack(item.embeddings, 4).deepstack == ()
    with pytest.raises(ValueError, match="hidden size 5"):
        unpack(torch.randn(3, 8), 5)
