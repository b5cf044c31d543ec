"""The decoder's and router's plan per family: plan_decode against the family's own sampling, sizing and tiling;
the router's exact prompt count against the llm's expanded ids; cache entries with DeepStack columns and times."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from mmserve.cache import CachedEmbedding, decode_value, encode_value, join_chunks
from mmserve.models.family import EncodedItem, MediaItem, family_of, pack, unpack
from mmserve.models.qwen2_5_vl.family import linspace_indices
from mmserve.transport import from_ref, to_ref
from mmserve.v1 import api_pb2
from services.llm.prompt import ChatMessage, MediaInput, PromptBuilder, PromptError
from services.router.media import MediaItem as RouterItem
from services.router.media import MediaStage
from services.router.planning import PromptBudget, patch_side

SIZES = [(72, 96), (200, 300), (500, 900), (1080, 1920), (40, 900)]
CLIPS = [(40, 10.0), (300, 30.0), (7, 25.0), (2000, 24.0)]


@pytest.fixture(scope="module", params=["qwen3_vl", "internvl"])
def ckpt(request, tmp_path_factory):
    from mmserve.models.internvl.tiny import build as build_internvl
    from mmserve.models.qwen3_vl.tiny import build as build_qwen3_vl

    build = {"qwen3_vl": build_qwen3_vl, "internvl": build_internvl}[request.param]
    return str(build(tmp_path_factory.mktemp(request.param), seed=0))


@pytest.fixture(scope="module")
def family(ckpt):
    return family_of(ckpt)


@pytest.mark.parametrize("height,width", SIZES)
def test_image_plan_is_the_familys(family, height, width):
    plan = family.plan_decode("image", family.default_params("image"), height, width)
    item = family.plan_image(height, width)
    assert plan.item == item
    if family.name == "internvl":  # the tiles and thumbnail, each one tile
        assert (plan.num_frames, plan.height, plan.width) == (item.grid[0], 448, 448)
    else:
        s = family.settings
        assert (plan.num_frames, plan.height, plan.width) == (1, item.grid[1] * s.patch_size, item.grid[2] * s.patch_size)


@pytest.mark.parametrize("total,fps", CLIPS)
@pytest.mark.parametrize("height,width", SIZES[:3])
def test_video_plan_is_the_familys(family, total, fps, height, width):
    plan = family.plan_decode("video", family.default_params("video"), height, width, total, fps)
    if family.name == "internvl":
        indices = family.sample_frames(total, min(family.settings.num_frames, total))
        assert (plan.height, plan.width, plan.item) == (448, 448, family.plan_video(len(indices)))
    else:
        indices = family.sample_frames(total, fps)
        assert (plan.height, plan.width) == family.frame_size(len(indices), height, width)
        assert plan.item == family.plan_video(indices, fps, height, width)  # timestamps included
    assert list(plan.frame_indices) == indices and plan.num_frames == len(indices)


def test_qwen2_5_frame_indices_are_torch_linspace():
    for total, n in [(40, 4), (300, 20), (1001, 768), (7, 4), (95, 94)]:
        assert list(linspace_indices(total, n)) == torch.linspace(0, total - 1, n).round().long().tolist()


def _stage(family, max_pixels: int = 0) -> MediaStage:
    """The router's media stage with the server's default caps (no replicas: only its planning is used)."""
    return MediaStage(decoders=None, encoders=None, cache=None, model_id="m", encoder_dtype="float32", family=family,
                      fetch_policy=None, max_pixels=max_pixels)


def _router_plan(family, stage: MediaStage, kind: str, height: int, width: int, total: int = 1, fps: float = 0.0):
    params = stage.params(RouterItem(kind, api_pb2.Media(data=b"x"), f"parts[0].{kind}"))
    return family.plan_decode(kind, params, height, width, total, fps)


def test_router_plans_a_large_video_as_the_family_does(family):
    """The server's per-item cap (16,777,216 pixels by default) bounds one frame: Qwen3-VL's budget of all frames
    (25,165,824) is the video processor's, not cut to the cap."""
    for height, width, total, fps in [(1080, 1920, 2000, 24.0), (720, 1280, 300, 30.0)]:
        plan = _router_plan(family, _stage(family), "video", height, width, total, fps)
        assert plan == family.plan_decode("video", family.default_params("video"), height, width, total, fps)
    if family.name == "qwen3_vl":
        assert plan.num_frames * plan.height * plan.width > 16_777_216


@pytest.mark.parametrize("height,width", SIZES)
def test_server_pixel_cap_bounds_each_frame(family, height, width):
    if family.name == "internvl":
        pytest.skip("InternVL frames are fixed 448-pixel tiles: its cap counts tiles")
    cap = 100_000  # above Qwen3-VL's image floor (65,536)
    for kind, total, fps in [("image", 1, 0.0), ("video", 8, 4.0), ("video", 2000, 24.0)]:
        plan = _router_plan(family, _stage(family, cap), kind, height, width, total, fps)
        assert plan.height * plan.width <= cap


def test_patch_side_is_the_familys(family):
    assert patch_side(family) == {"qwen3_vl": 16, "internvl": 14}[family.name]


def _video_item(family, total=60, fps=10.0, height=72, width=96) -> MediaItem:
    return family.plan_decode("video", family.default_params("video"), height, width, total, fps).item


CONVERSATIONS = {
    "image": [("user", ["image:200x300", "What is in the picture?"])],
    "two images and a video, turns": [
        ("system", ["You answer in one word."]),
        ("user", ["image:72x96", "and", "image:500x900", "compare héllo 日本"]),
        ("assistant", ["Cats."]),
        ("user", ["video", "Now this clip?"])],
    "video then image": [("user", ["video", "image:40x900", ""])],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_router_count_is_the_llms_expanded_ids(ckpt, family, name):
    def item_of(part: str) -> MediaItem:
        if part == "video":
            return _video_item(family)
        height, width = (int(x) for x in part.removeprefix("image:").split("x"))
        return family.plan_image(height, width)

    def is_media(part: str) -> bool:
        return part == "video" or part.startswith("image:")

    conversation = CONVERSATIONS[name]
    items = [item_of(p) for _, parts in conversation for p in parts if is_media(p)]
    pending = iter(items)
    builder = PromptBuilder(AutoTokenizer.from_pretrained(ckpt), family, AutoConfig.from_pretrained(ckpt))
    messages = [ChatMessage(role, [part if not is_media(part) else
                                   _media_input(family, next(pending), builder.num_deepstack_layers)
                                   for part in parts]) for role, parts in conversation]
    ids, _ = builder.build(messages)
    request = api_pb2.GenerateRequest(messages=[api_pb2.Message(role=role, parts=[
        api_pb2.Part(**{part.split(":")[0]: api_pb2.Media(data=b"x")}) if is_media(part) else api_pb2.Part(text=part)
        for part in parts]) for role, parts in conversation])
    size = PromptBudget(ckpt, family, max_model_len=1 << 20, max_vision_tokens=1 << 20).check(request, items)
    assert size.num_tokens == len(ids)
    assert size.num_vision_tokens == sum(family.num_tokens(i) for i in items)


def test_a_video_without_timestamps_is_refused_naming_them(ckpt, family):
    """Qwen3-VL writes a time before each temporal group: a video sent without them names the timestamps, not a
    placeholder count; InternVL writes none and builds."""
    builder = PromptBuilder(AutoTokenizer.from_pretrained(ckpt), family, AutoConfig.from_pretrained(ckpt))
    item = dataclasses.replace(_video_item(family), timestamps=())
    messages = [ChatMessage("user", [_media_input(family, item, builder.num_deepstack_layers), "What?"])]
    if family.name == "qwen3_vl":
        with pytest.raises(PromptError, match=f"video: 0 timestamps for {item.grid[0]} temporal groups"):
            builder.build(messages)
    else:
        builder.build(messages)


def _media_input(family, item: MediaItem, num_deepstack_layers: int) -> MediaInput:
    rows = family.num_tokens(item)
    return MediaInput(item.kind, torch.zeros(rows, 8), item.grid, timestamps=item.timestamps,
                      deepstack=tuple(torch.zeros(rows, 8) for _ in range(num_deepstack_layers)))


def test_cache_entries_keep_deepstack_columns_and_timestamps():
    hidden, rows = 8, 6
    encoded = EncodedItem(torch.randn(2 * rows, hidden), (torch.randn(2 * rows, hidden), torch.randn(2 * rows, hidden)))
    chunks = [CachedEmbedding(to_ref(pack(encoded.rows(i * rows, (i + 1) * rows))), (1, 4, 6), 0.0, i, 2,
                              2 * i, 2, timestamps=(0.25 + i,)) for i in range(2)]
    read = [decode_value(encode_value(c)) for c in chunks]
    assert [r.timestamps for r in read] == [(0.25,), (1.25,)]
    joined = join_chunks(read)
    assert joined.grid_thw == (2, 4, 6) and joined.timestamps == (0.25, 1.25)
    back = unpack(from_ref(joined.embeddings), hidden)
    assert torch.equal(back.embeddings, encoded.embeddings)
    assert all(torch.equal(a, b) for a, b in zip(back.deepstack, encoded.deepstack)) and len(back.deepstack) == 2
    assert decode_value(encode_value(chunks[0]), header_only=True).timestamps == (0.25,)
