"""Qwen3-VL and InternVL served by the llm engine: greedy output equals transformers' generate on the same
checkpoint and pixels, alone, eight at once, in chunks and from the prefix cache, and it depends on the media.

Embeddings come from the family's own preprocess and encode, packed as the encoder sends them and read back by the
llm servicer's messages_from_proto, so the server's unpacking, grids and timestamps are on the path too.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import InternVLForConditionalGeneration, Qwen3VLForConditionalGeneration

from mmserve.models.family import EncodedItem, MediaItem, family_of, pack
from mmserve.models.internvl.tiny import build as build_internvl
from mmserve.models.qwen3_vl.tiny import build as build_qwen3_vl
from mmserve.v1 import decoder_pb2, llm_pb2
from services.llm.config import LlmConfig
from services.llm.engine import Engine, Finished
from services.llm.prompt import PromptError
from services.llm.server import messages_from_proto
from services.llm.sequence import SamplingOptions
from tests.unit.family_parity import hf_generate_inputs, our_prompt

NUM_TOKENS = 12
VIDEO_FPS = 4.0
# checkpoint name -> (builder, its preset, transformers' class); InternVL with its Qwen2 and its Qwen3 text model.
BUILDERS = {"qwen3_vl": (build_qwen3_vl, "tiny", Qwen3VLForConditionalGeneration),
            "internvl": (build_internvl, "tiny", InternVLForConditionalGeneration),
            "internvl_qwen3": (build_internvl, "tiny-qwen3", InternVLForConditionalGeneration)}
_KINDS = {"image": decoder_pb2.MEDIA_KIND_IMAGE, "video": decoder_pb2.MEDIA_KIND_VIDEO}


@dataclasses.dataclass(frozen=True)
class Media:
    """One image or video as the llm receives it, with the pixels transformers gets for the same item."""

    pixels: torch.Tensor
    item: MediaItem
    encoded: EncodedItem


@dataclasses.dataclass
class Served:
    name: str
    checkpoint: str
    family: object
    tower: torch.nn.Module
    model: torch.nn.Module  # transformers' full model: the reference
    engine: Engine

    def image(self, seed: int, width: int = 96, height: int = 96) -> Media:
        rng = np.random.default_rng(seed)
        picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        return self._encode(*self.family.preprocess_image(picture))

    def video(self, seed: int, reverse: bool = False) -> Media:
        frames = clip(seed)
        if self.family.name == "internvl":
            frames = frames[self.family.sample_frames(frames.shape[0], 2)]
            return self._encode(*self.family.preprocess_video(frames.flip(0) if reverse else frames))
        indices = self.family.sample_frames(frames.shape[0], VIDEO_FPS)
        frames = frames[indices]
        return self._encode(*self.family.preprocess_video(frames.flip(0) if reverse else frames, indices, VIDEO_FPS))

    def _encode(self, pixels: torch.Tensor, item: MediaItem) -> Media:
        return Media(pixels, item, self.family.encode(self.tower, pixels, [item])[0])


def clip(seed: int, num_frames: int = 24, height: int = 96, width: int = 128) -> torch.Tensor:
    """Frames of one random colour each plus blocky noise (a tiny random model tells colours apart, not noise)."""
    rng = np.random.default_rng(seed)
    colors = rng.integers(0, 256, (num_frames, 1, 1, 3))
    noise = rng.integers(-20, 21, (num_frames, height // 8, width // 8, 3)).repeat(8, axis=1).repeat(8, axis=2)
    return torch.from_numpy(np.clip(colors + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def served(request, tmp_path_factory):
    build, preset, model_class = BUILDERS[request.param]
    checkpoint = str(build(tmp_path_factory.mktemp(request.param), seed=0, preset=preset))
    family = family_of(checkpoint)
    engine = make_engine(checkpoint)
    try:
        yield Served(request.param, checkpoint, family, family.load_vision_tower(checkpoint),
                     model_class.from_pretrained(checkpoint).eval(), engine)
    finally:
        engine.stop()


def make_engine(checkpoint: str, **overrides) -> Engine:
    engine = Engine(LlmConfig(model=checkpoint, block_size=4, **overrides))
    engine.start()
    return engine


def prepare(served: Served, request_id: str, conversation: list, engine: Engine | None = None):
    """The sequence the llm makes of a conversation [(role, [text or Media, ...])]: packed tensors and the
    protobuf messages through the servicer's messages_from_proto, then the engine's prepare."""
    engine = engine or served.engine
    messages, tensors = [], []
    for role, parts in conversation:
        message = llm_pb2.LlmMessage(role=role)
        for part in parts:
            if isinstance(part, str):
                message.parts.add(text=part)
                continue
            message.parts.add(media=llm_pb2.MediaEmbedding(
                kind=_KINDS[part.item.kind], grid_thw=part.item.grid, timestamps=part.item.timestamps))
            tensors.append(pack(part.encoded))
        messages.append(message)
    options = SamplingOptions(max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS, temperature=0.0)
    return engine.prepare(request_id, messages_from_proto(messages, tensors, engine.hidden_size), options)


@torch.no_grad()
def reference(served: Served, seq, conversation: list) -> list[int]:
    """transformers' greedy generate on the same prompt ids and the same pixel values; the ids are first checked
    against the family's expansion of the planned items (proved equal to transformers' processors in the unit
    tests), so grids and timestamps must have crossed the wire intact."""
    media = [p for _, parts in conversation for p in parts if isinstance(p, Media)]
    chat = [{"role": role, "content": [{"type": "text", "text": p} if isinstance(p, str) else {"type": p.item.kind}
                                       for p in parts]} for role, parts in conversation]
    expected = our_prompt(served.family, served.engine.tokenizer, chat, [m.item for m in media])
    assert seq.token_ids[:seq.num_prompt_tokens] == expected
    inputs = hf_generate_inputs(served.family, expected, [(m.pixels, m.item) for m in media])
    out = served.model.generate(**inputs, do_sample=False, max_new_tokens=NUM_TOKENS, min_new_tokens=NUM_TOKENS)
    return out[0, len(expected):].tolist()


async def run(engine: Engine, seq) -> list[int]:
    return [t for event in [e async for e in engine.generate(seq)] if not isinstance(event, Finished)
            for t in event.token_ids]


def cases(served: Served, seed: int = 0) -> dict[str, list]:
    """The prompt shapes of the parity tests; seed varies the media."""
    image, other, video = served.image(1 + seed), served.image(2 + seed, 200, 100), served.video(10 + seed)
    return {
        "text": [("user", [f"Tell me story number {seed}."])],
        "image": [("user", [image, "Describe."])],
        "two_images": [("user", [image, "and", other])],
        "video": [("user", [video, "What happens?"])],
        "image_video": [("user", [image, video, "Compare."])],
        "video_image": [("user", [video, image, "Compare."])],
        "multi_turn": [("system", ["You are terse."]), ("user", [image, "What?"]), ("assistant", ["A dog."]),
                       ("user", ["Why?"])],
    }


@pytest.mark.parametrize("case", ["text", "image", "two_images", "video", "image_video", "video_image",
                                  "multi_turn"])
async def test_each_prompt_equals_transformers_generate(served, case):
    conversation = cases(served)[case]
    seq = prepare(served, f"{served.name}-{case}", conversation)
    assert await run(served.engine, seq) == reference(served, seq, conversation)


async def test_eight_requests_in_flight_equal_transformers_generate(served):
    conversations = list(cases(served, seed=20).values()) + [[("user", [served.image(40), "Once more."])]]
    seqs = [prepare(served, f"{served.name}-flight{i}", c) for i, c in enumerate(conversations)]
    assert len(seqs) == 8
    results = await asyncio.gather(*(run(served.engine, s) for s in seqs))
    for i, (got, seq, conversation) in enumerate(zip(results, seqs, conversations)):
        assert got == reference(served, seq, conversation), f"request {i}"


async def test_chunked_prefill_cuts_media_and_equals_transformers_generate(served):
    budget = 48  # under one item's rows: chunk boundaries fall inside images and videos
    engine = make_engine(served.checkpoint, max_num_batched_tokens=budget)
    try:
        conversations = [[("user", [served.image(3), served.video(13), "Compare."])],
                         [("user", [served.video(14), "Then", served.image(4, 200, 100)])]]
        seqs = [prepare(served, f"chunk{i}", c, engine) for i, c in enumerate(conversations)]
        first = seqs[0]
        assert any(start < k * budget < end for start, end, _ in first.media_spans
                   for k in range(1, first.num_prompt_tokens // budget + 1)), "a chunk boundary inside an item"
        results = await asyncio.gather(*(run(engine, s) for s in seqs))
        for got, seq, conversation in zip(results, seqs, conversations):
            assert got == reference(served, seq, conversation)
    finally:
        engine.stop()


async def test_prefix_cache_hit_with_a_new_question_equals_transformers_generate(served):
    engine = served.engine
    image = served.image(5)
    system = ("system", ["You are a careful assistant who answers in one short sentence. " * 3])
    first = prepare(served, "prefix1", [system, ("user", [image, "What is this?"])])
    await run(engine, first)
    conversation = [system, ("user", [image, "Where is it?"])]
    second = prepare(served, "prefix2", conversation)
    got = await run(engine, second)
    assert second.num_cached_tokens >= second.media_spans[0][1] - 4, "system prompt and image KV are reused"
    assert got == reference(served, second, conversation)
    other = prepare(served, "prefix3", [system, ("user", [served.image(6), "Where is it?"])])
    await run(engine, other)
    assert other.num_cached_tokens < other.media_spans[0][0] + 4, "another image must not hit"
    if image.encoded.deepstack:  # same embeddings, other DeepStack features: other KV from the first layer on
        changed = dataclasses.replace(image, encoded=EncodedItem(
            image.encoded.embeddings, tuple(d.flip(0) for d in image.encoded.deepstack)))
        same_rows = prepare(served, "prefix4", [system, ("user", [changed, "Where is it?"])])
        await run(engine, same_rows)
        assert same_rows.num_cached_tokens < same_rows.media_spans[0][0] + 4, "other DeepStack rows must not hit"


async def test_different_media_change_the_greedy_output(served):
    async def answer(media: Media, name: str) -> list[int]:
        return await run(served.engine, prepare(served, f"sense-{name}", [("user", [media, "Describe."])]))

    assert await answer(served.image(1), "image1") != await answer(served.image(2), "image2")
    video = await answer(served.video(5), "video5")
    assert video != await answer(served.video(6), "video6")
    assert video != await answer(served.video(5, reverse=True), "video5-reversed")


def test_an_item_without_the_models_deepstack_layers_is_refused(served):
    image = served.image(7)
    # Qwen3-VL's items must bring their DeepStack features; InternVL takes none.
    deepstack = () if image.encoded.deepstack else (image.encoded.embeddings,)
    wrong = dataclasses.replace(image, encoded=EncodedItem(image.encoded.embeddings, deepstack))
    with pytest.raises(PromptError, match="DeepStack layers"):
        prepare(served, "wrong-deepstack", [("user", [wrong, "Describe."])])
