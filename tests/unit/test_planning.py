"""The router's plan before any media work: grids equal to what the decoder makes, prompt lengths equal to the llm's."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from mmserve.cache_keys import MediaParams
from mmserve.media import preprocess as pp
from mmserve.media.image import decode_image
from mmserve.media.samples import make_image, make_video
from mmserve.media.video import decode_video
from mmserve.models.family import MediaItem, family_of
from mmserve.models.qwen2_5_vl import Qwen25VL
from mmserve.v1 import api_pb2
from services.llm.prompt import ChatMessage, MediaInput, PromptBuilder
from services.router.planning import PromptBudget, planned_shape
from services.router.validation import ValidationError

FAMILY = Qwen25VL(pp.ImageProcessing(), {"image_token_id": 1, "video_token_id": 2, "vision_config": {}})
IMAGE = MediaParams("image", min_pixels=pp.MIN_PIXELS, max_pixels=pp.MAX_PIXELS)
VIDEO = MediaParams("video", fps=pp.FPS, min_frames=pp.FPS_MIN_FRAMES, max_frames=pp.FPS_MAX_FRAMES,
                    min_pixels=pp.VIDEO_MIN_PIXELS, max_pixels=pp.VIDEO_MAX_PIXELS, total_pixels=pp.VIDEO_TOTAL_PIXELS)


@pytest.mark.parametrize("size", [(84, 56), (640, 480), (37, 1000), (3000, 2000)])
@pytest.mark.parametrize("bounds", [(pp.MIN_PIXELS, pp.MAX_PIXELS), (3136, 50176), (200_000, 300_000)])
def test_image_grid_is_the_decoders(size, bounds):
    data = make_image(width=size[0], height=size[1], fmt="JPEG")
    params = dataclasses.replace(IMAGE, min_pixels=bounds[0], max_pixels=bounds[1])
    frames = decode_image(data, min_pixels=bounds[0], max_pixels=bounds[1])
    shape = planned_shape("image", data, params, FAMILY)
    _, h, w, _ = frames.shape
    assert (shape.num_frames, shape.num_pixels, shape.num_patches) == (1, h * w, (h // 14) * (w // 14))


@pytest.mark.parametrize("clip", [dict(seconds=2.0, fps=30, width=320, height=240),
                                  dict(seconds=3.1, fps=25, width=200, height=360, container="matroska", codec="vp9"),
                                  dict(seconds=1.0, fps=8, width=64, height=48)])
@pytest.mark.parametrize("options", [{}, dict(fps=1.0, max_frames=4), dict(min_pixels=3136, max_pixels=50176)])
def test_video_grid_is_the_decoders(clip, options):
    data = make_video(**clip)
    params = dataclasses.replace(VIDEO, **options)
    decoded = decode_video(data, fps=params.fps, min_frames=params.min_frames, max_frames=params.max_frames,
                           min_pixels=params.min_pixels, max_pixels=params.max_pixels, total_pixels=params.total_pixels)
    t, h, w, _ = decoded.frames.shape
    shape = planned_shape("video", data, params, FAMILY)
    assert (shape.num_frames, shape.num_pixels, shape.num_patches) == (t, t * h * w, (t // 2) * (h // 14) * (w // 14))


def test_unreadable_media_is_left_to_the_decoder():
    assert planned_shape("image", b"not a picture", IMAGE, FAMILY) is None
    assert planned_shape("video", b"\x00garbage" * 50, VIDEO, FAMILY) is None


@pytest.fixture(scope="module")
def builder(tiny_model):
    return PromptBuilder(AutoTokenizer.from_pretrained(tiny_model), family_of(tiny_model),
                         AutoConfig.from_pretrained(tiny_model))


def budget(tiny_model, **caps) -> PromptBudget:
    return PromptBudget(str(tiny_model), family_of(tiny_model), **{"max_model_len": 32768, "max_vision_tokens": 16384,
                                                                   **caps})


def images(*grids) -> list[MediaItem]:
    return [MediaItem("image", grid) for grid in grids]


def part(kind: str, value) -> api_pb2.Part:
    return api_pb2.Part(text=value) if kind == "text" else api_pb2.Part(**{kind: api_pb2.Media(data=b"x")})


CONVERSATIONS = {
    "text": [("user", [("text", "Hello there, how are you?")])],
    "image": [("user", [("image", (1, 8, 12)), ("text", "What is in the picture?")])],
    "system, two images, video, turns": [
        ("system", [("text", "You answer in one word.")]),
        ("user", [("image", (1, 4, 4)), ("text", "and"), ("image", (1, 10, 6)), ("text", "compare héllo 日本")]),
        ("assistant", [("text", "Cats.")]),
        ("user", [("video", (3, 8, 8)), ("text", "Now this clip?")])],
    "video then image": [("user", [("video", (2, 6, 10)), ("image", (1, 2, 2)), ("text", "")])],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_prompt_length_is_the_llms(tiny_model, builder, name):
    conversation = CONVERSATIONS[name]
    request = api_pb2.GenerateRequest(messages=[
        api_pb2.Message(role=role, parts=[part(kind, value) for kind, value in parts]) for role, parts in conversation])
    grids = [value for _, parts in conversation for kind, value in parts if kind != "text"]
    messages = [ChatMessage(role, [value if kind == "text" else MediaInput(
        kind, torch.zeros(value[0] * value[1] * value[2] // 4, 8), value) for kind, value in parts])
        for role, parts in conversation]
    ids, _ = builder.build(messages)
    kinds = [kind for _, parts in conversation for kind, _ in parts if kind != "text"]
    size = budget(tiny_model).check(request, [MediaItem(kind, grid) for kind, grid in zip(kinds, grids)])
    assert size.num_tokens == len(ids)
    assert size.num_vision_tokens == sum(t * h * w // 4 for t, h, w in grids)


def test_a_prompt_that_cannot_fit_names_its_parts(tiny_model, builder):
    request = api_pb2.GenerateRequest(messages=[api_pb2.Message(role="user", parts=[
        part("image", None), part("text", "words " * 50)])], sampling=api_pb2.SamplingParams(max_tokens=100))
    size = budget(tiny_model).check(request, images((1, 8, 8)))
    context = size.num_tokens + 100
    budget(tiny_model, max_model_len=context).check(request, images((1, 8, 8)))  # exactly full: accepted
    with pytest.raises(ValidationError) as info:
        budget(tiny_model, max_model_len=context - 1).check(request, images((1, 8, 8)))
    assert str(info.value) == (f"prompt: {size.num_tokens} tokens ({size.num_text_tokens} text + 16 vision) + "
                               f"max_tokens 100 exceed the context length {context - 1}")


def test_vision_tokens_over_the_cap_are_refused(tiny_model):
    request = api_pb2.GenerateRequest(messages=[api_pb2.Message(role="user", parts=[
        part("image", None), part("image", None), part("text", "hi")])])
    budget(tiny_model, max_vision_tokens=200).check(request, images((1, 20, 20), (1, 20, 20)))
    with pytest.raises(ValidationError, match="messages: 202 vision tokens exceed the limit of 200"):
        budget(tiny_model, max_vision_tokens=200).check(request, images((1, 20, 20), (1, 24, 17)))


def test_a_placeholder_in_the_text_is_refused(tiny_model):
    request = api_pb2.GenerateRequest(messages=[api_pb2.Message(role="user", parts=[
        part("text", "look: <|image_pad|>")])])
    with pytest.raises(ValidationError, match="text: contains a reserved media placeholder token"):
        budget(tiny_model).check(request, [])
