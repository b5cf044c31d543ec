"""Qwen3-VL family module against transformers: preprocessing, timestamps, positions, DeepStack encode, and
greedy decode through our splice into the text model alone vs the full model's generate."""

import json
import types

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor, smart_resize as hf_video_resize
from transformers.video_utils import VideoMetadata

from mmserve.media.preprocess import resize_frames
from mmserve.models.family import family_of
from mmserve.models.qwen3_vl import chat_template
from mmserve.models.qwen3_vl.tiny import build
from tests.unit.family_parity import assert_same_decode, hf_greedy, our_greedy, our_prompt

VIDEO_FPS = 4.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build(tmp_path_factory.mktemp("qwen3_vl"), seed=0)


@pytest.fixture(scope="module")
def family(ckpt):
    return family_of(ckpt)


@pytest.fixture(scope="module")
def hf(ckpt):
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    # Qwen3VLProcessor's constructor checks its video processor through torchvision, so its placeholder methods run
    # on a stand-in holding what they read.
    processor = types.SimpleNamespace(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(ckpt), video_processor=video_processor(ckpt),
        image_token="<|image_pad|>", video_token="<|video_pad|>", vision_start_token="<|vision_start|>",
        vision_end_token="<|vision_end|>")
    for name in ("replace_image_token", "replace_video_token", "_calculate_timestamps"):
        setattr(processor, name, types.MethodType(getattr(Qwen3VLProcessor, name), processor))
    model = Qwen3VLForConditionalGeneration.from_pretrained(ckpt).eval()
    return tokenizer, processor, model


@pytest.fixture(scope="module")
def ours(ckpt, family):
    text_model, lm_head = family.load_language_model(ckpt)
    return family.load_vision_tower(ckpt), text_model, lm_head


def video_processor(ckpt):
    """transformers' video processor with the checkpoint's settings (its from_pretrained asks for torchvision;
    its sampling, sizing and patchify do not)."""
    config = json.loads((ckpt / "video_preprocessor_config.json").read_text())
    return Qwen3VLVideoProcessor(**{k: v for k, v in config.items() if not k.endswith(("_type", "_class"))})


def image(seed, width, height):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def clip(seed, num_frames=16, height=72, width=96):
    """A clip of smooth random frames (uint8 [T,H,W,3]) at VIDEO_FPS."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (num_frames, height // 8, width // 8, 3), dtype=np.uint8)
    return torch.from_numpy(small.repeat(8, axis=1).repeat(8, axis=2).copy())


def sampled(family, frames):
    indices = family.sample_frames(frames.shape[0], VIDEO_FPS)
    return frames[indices], indices


@pytest.mark.parametrize(("width", "height"), [(100, 140), (640, 480), (33, 300), (1000, 700)])
def test_image_pixels_equal_transformers(family, ckpt, width, height):
    img = image(width, width, height)
    ref = Qwen2VLImageProcessorPil.from_pretrained(ckpt)(images=[img], return_tensors="pt")
    pixels, item = family.preprocess_image(img)
    assert list(item.grid) == ref["image_grid_thw"][0].tolist()
    assert (pixels - ref["pixel_values"]).abs().max().item() == 0.0
    assert family.num_tokens(item) == ref["image_grid_thw"][0].prod().item() // 4


@pytest.mark.parametrize(("total", "height", "width"), [(16, 72, 96), (37, 480, 640), (9, 1080, 1920)])
def test_video_sampling_sizing_and_pixels_equal_transformers(family, ckpt, total, height, width):
    processor = video_processor(ckpt)
    metadata = VideoMetadata(total_num_frames=total, fps=VIDEO_FPS)
    indices = family.sample_frames(total, VIDEO_FPS)
    assert indices == processor.sample_frames(metadata).tolist()
    s = family.settings
    assert family.frame_size(len(indices), height, width) == hf_video_resize(
        len(indices), height, width, temporal_factor=2, factor=32, min_pixels=s.video_min_pixels,
        max_pixels=s.video_max_pixels)
    frames = clip(total, total, height, width)[indices]
    pixels, item = family.preprocess_video(frames, indices, VIDEO_FPS)
    h, w = family.frame_size(len(indices), height, width)
    resized = resize_frames(frames, h, w).permute(0, 3, 1, 2).unsqueeze(0)
    # rescale_and_normalize's fused constants, then torchvision's normalize ((x - mean) / std), which needs torchvision.
    mean, std, _ = processor._fuse_mean_std_and_rescale_factor(True, tuple(s.image_mean), tuple(s.image_std), True,
                                                               1 / 255)
    normalized = (resized.float() - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    ref, *grid = processor.patchify(normalized, patch_size=16, merge_size=2, temporal_patch_size=2)
    assert tuple(grid) == item.grid
    assert (pixels - ref[0]).abs().max().item() == 0.0


def test_video_timestamps_and_placeholders_equal_the_processor(family, hf):
    _, processor, _ = hf
    frames, indices = sampled(family, clip(0, 21))
    _, item = family.preprocess_video(frames, indices, VIDEO_FPS)
    metadata = VideoMetadata(total_num_frames=21, fps=VIDEO_FPS, frames_indices=list(indices))
    ref = processor.replace_video_token({"video_grid_thw": torch.tensor([item.grid]), "video_metadata": [metadata]}, 0)
    text = "<|vision_start|><|video_pad|><|vision_end|>"
    ours = family.expand_prompt(text, [item])
    pad_rows = family.tokens_per_group(item)
    assert ours.replace("<|video_pad|>", "<|video_pad|>" * pad_rows) == text.replace("<|video_pad|>", ref)
    assert family.chunk_boundaries(item) == [g * pad_rows for g in range(1, item.grid[0])]


def test_chat_templates(ckpt, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    assert tokenizer.chat_template == chat_template.INSTRUCT
    conversation = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                    {"role": "assistant", "content": "<think>\nlooks\n</think>\n\nA cat."},
                    {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And?"}]}]
    assert tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "What?<|im_end|>\n<|im_start|>assistant\n<think>\nlooks\n</think>\n\nA cat.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|video_pad|><|vision_end|>And?<|im_end|>\n<|im_start|>assistant\n")
    thinking = AutoTokenizer.from_pretrained(build(tmp_path, thinking=True))
    # Earlier turns lose their reasoning; the answer opens a think block.
    assert thinking.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
        "And?<|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_instruct_template_drops_later_system_messages_and_splits_tool_calls(ckpt):
    """As Qwen3-VL-Instruct's shipped template: a system message after the first is not rendered, and a tool call
    starts on a new line only when the assistant message has content."""
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    call = {"function": {"name": "f", "arguments": {"x": 1}}}
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                    {"role": "system", "content": "later"},
                    {"role": "assistant", "content": [{"type": "text", "text": ""}], "tool_calls": [call]},
                    {"role": "assistant", "content": "", "tool_calls": [call]}]
    tool_call = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        f"<|im_start|>assistant\n\n{tool_call}<|im_end|>\n<|im_start|>assistant\n{tool_call}<|im_end|>\n")


def _hf_inputs(processor, tokenizer, text, images, videos):
    """The processor's own inputs; videos (whose processor needs torchvision) are expanded with its
    replace_video_token and patchified above, then the processor expands the images and types the tokens."""
    for frames, indices, pixels, item in videos:
        metadata = VideoMetadata(total_num_frames=len(indices), fps=VIDEO_FPS, frames_indices=list(indices))
        markup = processor.replace_video_token({"video_grid_thw": torch.tensor([item.grid]),
                                                "video_metadata": [metadata]}, 0)
        text = text.replace("<|video_pad|>", markup.replace("<|video_pad|>", "<|placeholder|>"), 1)
    text = text.replace("<|placeholder|>", "<|video_pad|>")
    inputs = {}
    if images:
        inputs.update(processor.image_processor(images=images, return_tensors="pt"))
        markups = [processor.replace_image_token(inputs, i) for i in range(len(images))]
        text = text.replace("<|image_pad|>", "<|placeholder|>")
        for markup in markups:
            text = text.replace("<|placeholder|>", markup, 1)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    types_ = torch.zeros_like(ids, dtype=torch.int32)
    types_[ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")] = 1
    types_[ids == tokenizer.convert_tokens_to_ids("<|video_pad|>")] = 2
    inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types_)
    if videos:
        inputs.update(pixel_values_videos=torch.cat([v[2] for v in videos]),
                      video_grid_thw=torch.tensor([v[3].grid for v in videos]))
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
    images = [image(1, 120, 90), image(2, 60, 200)][:num_images]
    videos = []
    for seed in range(num_videos):
        frames, indices = sampled(family, clip(seed + 10))
        videos.append((frames, indices, *family.preprocess_video(frames, indices, VIDEO_FPS)))
    prepared = [family.preprocess_image(img) for img in images]
    # Items in prompt order: the cases put images before videos.
    pixels = [p for p, _ in prepared] + [v[2] for v in videos]
    items = [i for _, i in prepared] + [v[3] for v in videos]
    encoded = [e for p, i in zip(pixels, items) for e in family.encode(tower, p, [i])]
    ids = our_prompt(family, tokenizer, conversation, items)
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    inputs = _hf_inputs(processor, tokenizer, text, images, videos)
    assert ids == inputs["input_ids"][0].tolist()
    if items:
        ref, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                            inputs.get("image_grid_thw"), inputs.get("video_grid_thw"))
        assert torch.equal(family.positions(ids, items)[0], ref[:, 0])
    assert_same_decode(our_greedy(family, text_model, lm_head, ids, encoded, items), hf_greedy(model, inputs))


def test_encode_equals_model_features_and_chunks_encode_like_the_whole(family, hf, ours):
    _, _, model = hf
    tower = ours[0]
    frames, indices = sampled(family, clip(3, 32))
    pixels, item = family.preprocess_video(frames, indices, VIDEO_FPS)
    whole = family.encode(tower, pixels, [item])[0]
    ref = model.model.get_video_features(pixels, torch.tensor([item.grid]), return_dict=True)
    assert torch.equal(whole.embeddings, ref.pooler_output[0])
    assert all(torch.equal(a, b[0]) for a, b in zip(whole.deepstack, ref.deepstack_features))
    assert len(whole.deepstack) == 2
    cut = family.chunk_boundaries(item)[0]
    rows_per_patch = 4  # merge 2x2: one embedding row per 4 patch rows
    first = family.encode(tower, pixels[:cut * rows_per_patch], [
        type(item)("video", (1, *item.grid[1:]))])[0]
    assert torch.allclose(first.embeddings, whole.rows(0, cut).embeddings, atol=1e-6)


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
    frames, indices = sampled(family, clip(5))
    other, _ = sampled(family, clip(6))
    forward = answer("video", family.preprocess_video(frames, indices, VIDEO_FPS))
    assert forward != answer("video", family.preprocess_video(other, indices, VIDEO_FPS))
    assert forward != answer("video", family.preprocess_video(frames.flip(0), indices, VIDEO_FPS))
