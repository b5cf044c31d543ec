"""Prompt building: placeholder expansion, embedding rows, and M-RoPE positions identical to transformers'."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from mmserve.models.family import family_of
from services.llm.prompt import ChatMessage, MediaInput, PromptBuilder, PromptError

HIDDEN = 64
MERGE = 2


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def config(tiny_model):
    return AutoConfig.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def builder(tokenizer, config, tiny_model):
    return PromptBuilder(tokenizer, family_of(tiny_model), config)


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model).eval()


_next_value = iter(range(1, 1_000_000))


def media(kind: str, grid: tuple[int, int, int], second_per_grid_t: float = 0.0, rows: int | None = None) -> MediaInput:
    """A media item whose embedding rows are all distinct (so their order can be checked)."""
    n = grid[0] * grid[1] * grid[2] // (MERGE * MERGE) if rows is None else rows
    start = next(_next_value) * 10_000
    embeddings = (torch.arange(n, dtype=torch.float32) + start)[:, None].expand(n, HIDDEN).clone()
    return MediaInput(kind, embeddings, grid, second_per_grid_t)


def image(h: int = 4, w: int = 6, **kw) -> MediaInput:
    return media("image", (1, h, w), **kw)


def video(t: int = 8, h: int = 4, w: int = 4, second_per_grid_t: float = 1.0, **kw) -> MediaInput:
    return media("video", (t, h, w), second_per_grid_t, **kw)


def user(*parts) -> ChatMessage:
    return ChatMessage("user", list(parts))


def reference_rope(model, config, ids: list[int], items: list[MediaInput]):
    """transformers' get_rope_index on the same ids: (positions [3, n], delta)."""
    input_ids = torch.tensor(ids)
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == config.image_token_id] = 1
    types[input_ids == config.video_token_id] = 2
    images = [m for m in items if m.kind == "image"]
    videos = [m for m in items if m.kind == "video"]
    with torch.no_grad():
        positions, delta = model.model.get_rope_index(
            input_ids[None],
            mm_token_type_ids=types[None],
            image_grid_thw=torch.tensor([m.grid_thw for m in images]) if images else None,
            video_grid_thw=torch.tensor([m.grid_thw for m in videos]) if videos else None,
            second_per_grid_ts=torch.tensor([m.second_per_grid_t for m in videos]) if videos else None,
        )
    return positions[:, 0], int(delta)


def pad_runs(ids: list[int], pad_ids: set[int]) -> list[tuple[int, int, int]]:
    """(token, start, length) of every maximal run of placeholder tokens."""
    runs = []
    for i, token in enumerate(ids):
        if token in pad_ids:
            if runs and runs[-1][0] == token and runs[-1][1] + runs[-1][2] == i:
                runs[-1] = (token, runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((token, i, 1))
    return runs


CASES = {
    "text only": [user("Describe the weather today.")],
    "one image": [user("What is in this picture?", image())],
    "image first, odd grid": [user(image(h=6, w=10), "count the cats")],
    "video 1.0 s": [user(video(second_per_grid_t=1.0), "what happens?")],
    "video 0.5 s": [user(video(second_per_grid_t=0.5), "what happens?")],
    "video 0.7 s": [user(video(t=12, second_per_grid_t=0.7), "what happens?")],
    "image video image": [
        ChatMessage("system", ["You are terse."]),
        user("first", image(), "then", video(t=6, h=6, w=4, second_per_grid_t=0.7)),
        ChatMessage("assistant", ["ok"]),
        user(image(h=8, w=4), "compare them"),
    ],
}


@pytest.mark.parametrize("name", list(CASES))
def test_positions_match_transformers(name, builder, hf_model, config):
    messages = CASES[name]
    items = [p for m in messages for p in m.parts if not isinstance(p, str)]
    ids, prompt = builder.build(messages)
    expected, expected_delta = reference_rope(hf_model, config, ids, items)
    assert prompt.positions.shape == (3, len(ids))
    assert torch.equal(prompt.positions, expected)
    assert prompt.rope_delta == expected_delta


def test_non_integer_time_interval_is_truncated_like_transformers(builder):
    # 0.7 s * 2 tokens/s = 1.4 per temporal step, truncated (rounding would give 0, 1, 3, 4, 6, 7, 8, 10).
    ids, prompt = builder.build([user(video(t=8, h=2, w=2, second_per_grid_t=0.7))])
    start = ids.index(builder.pad_ids["video"])
    temporal = prompt.positions[0, start:start + 8] - prompt.positions[0, start]
    assert temporal.tolist() == [0, 1, 2, 4, 5, 7, 8, 9]


def test_text_only_has_no_media_and_zero_delta(builder, tokenizer):
    ids, prompt = builder.build([user("hello there")])
    assert prompt.embeddings is None and prompt.rows is None
    assert prompt.rope_delta == 0
    assert torch.equal(prompt.positions, torch.arange(len(ids)).expand(3, -1))
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_rope_delta_continues_positions(builder):
    ids, prompt = builder.build(CASES["image video image"])
    assert int(prompt.positions.max()) + 1 == len(ids) + prompt.rope_delta


@pytest.mark.parametrize("name", [n for n in CASES if n != "text only"])
def test_one_run_of_pad_tokens_per_item_of_the_right_length(name, builder):
    messages = CASES[name]
    items = [p for m in messages for p in m.parts if not isinstance(p, str)]
    ids, _ = builder.build(messages)
    runs = pad_runs(ids, set(builder.pad_ids.values()))
    assert [(token, length) for token, _, length in runs] == [
        (builder.pad_ids[m.kind], m.grid_thw[0] * m.grid_thw[1] * m.grid_thw[2] // 4) for m in items]


@pytest.mark.parametrize("name", [n for n in CASES if n != "text only"])
def test_rows_map_pad_positions_to_consecutive_embedding_rows(name, builder):
    messages = CASES[name]
    items = [p for m in messages for p in m.parts if not isinstance(p, str)]
    ids, prompt = builder.build(messages)
    pads = set(builder.pad_ids.values())
    is_pad = torch.tensor([t in pads for t in ids])
    assert prompt.rows.shape == (len(ids),)
    assert torch.all(prompt.rows[~is_pad] == -1)
    assert prompt.rows[is_pad].tolist() == list(range(int(is_pad.sum())))
    # The embedding rows are the items' rows in prompt order.
    assert torch.equal(prompt.embeddings, torch.cat([m.embeddings for m in items]))
    for (_, start, length), item in zip(pad_runs(ids, pads), items):
        assert torch.equal(prompt.embeddings[prompt.rows[start:start + length]], item.embeddings)


def test_literal_image_placeholder_in_user_text_is_refused(builder):
    with pytest.raises(PromptError, match="image"):
        builder.build([user("please look at <|image_pad|> this")])


def test_literal_placeholder_next_to_a_real_image_is_refused(builder):
    with pytest.raises(PromptError):
        builder.build([user("sneaky <|image_pad|>", image())])


def test_literal_video_placeholder_in_system_text_is_refused(builder):
    with pytest.raises(PromptError, match="video"):
        builder.build([ChatMessage("system", ["<|video_pad|>"]), user("hi")])


@pytest.mark.parametrize("item", [
    image(rows=5),
    image(rows=7),
    video(t=4, h=4, w=4, rows=15),
], ids=["image too few", "image too many", "video too few"])
def test_embedding_count_not_matching_the_grid_is_refused(item, builder):
    with pytest.raises(PromptError, match="do not match grid"):
        builder.build([user("look", item)])


def test_prompt_error_is_a_value_error():
    assert issubclass(PromptError, ValueError)


def test_deepstack_layers_the_model_does_not_take_are_refused(builder):
    item = image()
    with_deepstack = MediaInput(item.kind, item.embeddings, item.grid_thw, deepstack=(item.embeddings,))
    with pytest.raises(PromptError, match="image: embeddings carry 1 DeepStack layers, the model takes 0"):
        builder.build([user(with_deepstack, "What is it?")])


def test_packed_embeddings_not_in_blocks_of_the_hidden_size_are_refused():
    from mmserve.v1 import decoder_pb2, llm_pb2
    from services.llm.server import messages_from_proto

    message = llm_pb2.LlmMessage(role="user")
    message.parts.add(media=llm_pb2.MediaEmbedding(kind=decoder_pb2.MEDIA_KIND_IMAGE, grid_thw=(1, 4, 6)))
    with pytest.raises(ValueError, match=r"messages\[0\]\.media\.embeddings: 65 columns"):
        messages_from_proto([message], [torch.zeros(6, HIDDEN + 1)], HIDDEN)
    with pytest.raises(ValueError, match=r"messages\[0\]\.media\.embeddings: shape \[6\] is not"):
        messages_from_proto([message], [torch.zeros(6)], HIDDEN)
    parsed = messages_from_proto([message], [torch.zeros(6, 3 * HIDDEN)], HIDDEN)[0].parts[0]
    assert parsed.embeddings.shape == (6, HIDDEN) and len(parsed.deepstack) == 2


def test_timestamps_not_one_per_temporal_group_are_refused(builder):
    clip = video(t=4)
    stamped = MediaInput(clip.kind, clip.embeddings, clip.grid_thw, clip.second_per_grid_t, timestamps=(0.5, 1.5))
    with pytest.raises(PromptError, match="video: 2 timestamps for 4 temporal groups"):
        builder.build([user(stamped, "What happens?")])
