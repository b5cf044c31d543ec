"""The family interface across families: family_of reads config.json, the router's planning imports no torch,
and Qwen2.5-VL's wrapper is input-sensitive and decodes like transformers."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mmserve.models.family import family_of
from mmserve.models.tiny import build_tiny_model
from tests.unit.family_parity import assert_same_decode, hf_greedy, our_greedy, our_prompt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("qwen2_5_vl"), seed=0)


def test_family_of_reads_model_type(ckpt, tmp_path):
    assert family_of(ckpt).name == "qwen2_5_vl"
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(ValueError, match="model_type 'llava'"):
        family_of(tmp_path)


def test_planning_loads_no_torch(ckpt):
    code = ("import sys\nfrom mmserve.models.family import family_of\n"
            f"f = family_of({str(ckpt)!r})\nitem = f.plan_image(480, 640)\nf.num_tokens(item)\n"
            "import mmserve.models.qwen3_vl, mmserve.models.internvl\n"
            "assert 'torch' not in sys.modules, 'torch loaded'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def image(seed, size=84):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def clip(seed):
    """Four 56x56 frames of one random colour each (plain noise averages away in a tiny random model)."""
    colors = np.random.default_rng(seed).integers(0, 256, (4, 1, 1, 3), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(colors, (4, 56, 56, 3))))


def test_qwen2_5_vl_wrapper_pixels_decode_and_input_sensitivity(ckpt):
    family = family_of(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    tower = family.load_vision_tower(str(ckpt))
    text_model, lm_head = family.load_language_model(str(ckpt))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt).eval()
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]

    def run(img):
        pixels, item = family.preprocess_image(img)
        ids = our_prompt(family, tokenizer, conversation, [item])
        return pixels, item, ids, our_greedy(family, text_model, lm_head, ids, family.encode(tower, pixels, [item]),
                                             [item])

    pixels, item, ids, ours = run(image(1))
    ref = Qwen2VLImageProcessorPil.from_pretrained(ckpt)(images=[image(1)], return_tensors="pt")
    assert (pixels - ref["pixel_values"]).abs().max().item() == 0.0
    input_ids = torch.tensor([ids])
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  mm_token_type_ids=(input_ids == family.image_token_id).int(), **ref)
    assert_same_decode(ours, hf_greedy(model, inputs))
    assert ours[0] != run(image(2))[3][0]
    frames, other = clip(3), clip(4)
    video = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe."}]}]

    def answer(clip):
        pixels, item = family.preprocess_video(clip, [0, 1, 2, 3], 2.0)
        ids = our_prompt(family, tokenizer, video, [item])
        return our_greedy(family, text_model, lm_head, ids, family.encode(tower, pixels, [item]), [item])[0]

    forward = answer(frames)
    assert forward != answer(other)
    assert forward != answer(frames.flip(0))
