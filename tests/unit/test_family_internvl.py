"""InternVL family module against transformers: tiling and pixels, frame sampling, placeholders, encoder
features, and greedy decode through our splice into the text model alone vs the full model's generate."""

import json
import types

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, InternVLForConditionalGeneration, InternVLProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
    GotOcr2ImageProcessorPil,
    get_optimal_tiled_canvas,
)

from mmserve.media.preprocess import resize_frames
from mmserve.models.family import family_of
from mmserve.models.internvl.family import tile_grid
from mmserve.models.internvl.tiny import CHAT_TEMPLATE, build
from tests.unit.family_parity import assert_same_decode, hf_greedy, our_greedy, our_prompt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build(tmp_path_factory.mktemp("internvl"), seed=0)


@pytest.fixture(scope="module")
def family(ckpt):
    return family_of(ckpt)


@pytest.fixture(scope="module")
def hf(ckpt):
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    # InternVLProcessor's constructor checks its video processor through torchvision, so its placeholder methods
    # run on a stand-in holding what they read.
    processor = types.SimpleNamespace(start_image_token="<img>", end_image_token="</img>",
                                      image_token="<IMG_CONTEXT>", image_seq_length=256)
    for name in ("replace_image_token", "replace_video_token"):
        setattr(processor, name, types.MethodType(getattr(InternVLProcessor, name), processor))
    return tokenizer, processor, InternVLForConditionalGeneration.from_pretrained(ckpt).eval()


@pytest.fixture(scope="module")
def ours(ckpt, family):
    text_model, lm_head = family.load_language_model(ckpt)
    return family.load_vision_tower(ckpt), text_model, lm_head


def image(seed, width, height):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def clip(seed, num_frames=24, height=64, width=80):
    """Frames of one random colour each plus blocky noise: 256 rows per frame average plain noise away, so clips
    that differ must differ in colour for a tiny random model to tell them apart."""
    rng = np.random.default_rng(seed)
    colors = rng.integers(0, 256, (num_frames, 1, 1, 3))
    noise = rng.integers(-20, 21, (num_frames, height // 8, width // 8, 3)).repeat(8, axis=1).repeat(8, axis=2)
    return torch.from_numpy(np.clip(colors + noise, 0, 255).astype(np.uint8))


def test_tile_grid_equals_transformers():
    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = (int(x) for x in rng.integers(10, 4000, 2))
        lo, hi = int(rng.integers(1, 3)), int(rng.integers(3, 13))
        assert tile_grid(h, w, 448, lo, hi) == get_optimal_tiled_canvas((h, w), (448, 448), lo, hi), (h, w, lo, hi)


@pytest.mark.parametrize(("width", "height"), [(96, 96), (200, 100), (640, 480), (300, 1000), (1500, 200)])
def test_image_tiles_equal_transformers(family, ckpt, width, height):
    img = image(width, width, height)
    ref = GotOcr2ImageProcessorPil.from_pretrained(ckpt)(images=[img], crop_to_patches=True, return_tensors="pt")
    pixels, item = family.preprocess_image(img)
    assert item.grid[0] == ref["num_patches"][0]
    assert (pixels - ref["pixel_values"]).abs().max().item() == 0.0
    assert family.num_tokens(item) == 256 * item.grid[0]


@pytest.mark.parametrize("total", [8, 24, 100, 31])
def test_frame_sampling_and_pixels_equal_the_video_processor_rules(family, ckpt, total):
    # InternVLVideoProcessor imports torchvision at module load, so its rules are restated here from its source:
    # sample_frames with initial_shift=True, and the fused rescale-and-normalize of its torchvision backend.
    indices = family.sample_frames(total)
    assert indices == torch.arange(total / 8 / 2, total, total / 8).int().tolist()
    frames = clip(total, total)[indices]
    pixels, item = family.preprocess_video(frames)
    config = json.loads((ckpt / "video_preprocessor_config.json").read_text())
    mean = torch.tensor(config["image_mean"]) * (1.0 / config["rescale_factor"])
    std = torch.tensor(config["image_std"]) * (1.0 / config["rescale_factor"])
    resized = resize_frames(frames, 448, 448).permute(0, 3, 1, 2).float()
    assert (pixels - (resized - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)).abs().max().item() == 0.0
    assert item.grid[0] == 8 and family.chunk_boundaries(item) == [256 * k for k in range(1, 8)]


def test_chat_template(ckpt):
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert (tokenizer.start_image_token, tokenizer.end_image_token, tokenizer.context_image_token) == (
        "<img>", "</img>", "<IMG_CONTEXT>")


def _hf_inputs(processor, tokenizer, text, images, videos):
    """The processor's placeholder expansion (images by num_patches, videos as labelled frames), tokenized."""
    for pixels, item in images:
        text = text.replace("<IMG_CONTEXT>\n", "<|placeholder|>\n", 1)
    for pixels, item in images:
        markup = processor.replace_image_token({"num_patches": [item.grid[0]]}, 0)
        text = text.replace("<|placeholder|>", markup, 1)
    for pixels, item in videos:
        text = text.replace("<video>", processor.replace_video_token({"pixel_values_videos": [pixels]}, 0), 1)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if images or videos:
        inputs["pixel_values"] = torch.cat([p for p, _ in images + videos])
    return inputs


CASES = {
    "text": ([{"role": "user", "content": "Tell me a story."}], 0, 0),
    "image": ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}], 1, 0),
    "two_images": ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                                 {"type": "image"}]}], 2, 0),
    "video": ([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}], 0, 1),
    "image_video": ([{"role": "user", "content": [{"type": "image"}, {"type": "video"},
                                                  {"type": "text", "text": "Compare."}]}], 1, 1),
    "multi_turn": ([{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                    {"role": "assistant", "content": "A dog."},
                    {"role": "user", "content": "Why?"}], 1, 0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_decode_equals_transformers_generate(case, family, hf, ours):
    tokenizer, processor, model = hf
    tower, text_model, lm_head = ours
    conversation, num_images, num_videos = CASES[case]
    images = [family.preprocess_image(img) for img in [image(1, 96, 96), image(2, 200, 100)][:num_images]]
    videos = [family.preprocess_video(clip(10 + k)[family.sample_frames(24, 2)]) for k in range(num_videos)]
    prepared = images + videos  # the cases put images before videos
    items = [item for _, item in prepared]
    encoded = [e for pixels, item in prepared for e in family.encode(tower, pixels, [item])]
    ids = our_prompt(family, tokenizer, conversation, items)
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    inputs = _hf_inputs(processor, tokenizer, text, images, videos)
    assert ids == inputs["input_ids"][0].tolist()
    if prepared:
        ref = model.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
        assert torch.equal(torch.cat([e.embeddings for e in encoded]), ref.reshape(-1, ref.shape[-1]))
    assert_same_decode(our_greedy(family, text_model, lm_head, ids, encoded, items), hf_greedy(model, inputs))


def test_different_media_change_the_greedy_output(family, hf, ours):
    tokenizer = hf[0]
    tower, text_model, lm_head = ours

    def answer(kind, pixels_item):
        pixels, item = pixels_item
        conversation = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": "Describe."}]}]
        ids = our_prompt(family, tokenizer, conversation, [item])
        return our_greedy(family, text_model, lm_head, ids, family.encode(tower, pixels, [item]), [item])[0]

    assert answer("image", family.preprocess_image(image(1, 96, 96))) != answer(
        "image", family.preprocess_image(image(2, 96, 96)))
    frames = clip(5)[family.sample_frames(24, 2)]
    forward = answer("video", family.preprocess_video(frames))
    assert forward != answer("video", family.preprocess_video(clip(6)[family.sample_frames(24, 2)]))
    assert forward != answer("video", family.preprocess_video(frames.flip(0)))
