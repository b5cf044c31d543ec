"""What transformers' own Qwen2.5-VL generate is given for our media: the reference the pipeline's parity tests and
the transformers baseline both use."""

from __future__ import annotations

import io

import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mmserve.media.preprocess import ImageProcessing, to_pixel_values
from mmserve.media.video import decode_video
from mmserve.v1 import api_pb2


class HfInputs:
    """A request with inline media → the keyword arguments of Qwen2_5_VLForConditionalGeneration.generate."""

    def __init__(self, model_dir: str, config: PreTrainedConfig):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # Images go through transformers' own processor: an independent check of our decoder.
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
        # transformers' video processor needs torchvision, so videos use our (separately tested) sampling.
        self.processing = ImageProcessing.from_pretrained(model_dir)
        self.config = config

    def _video(self, media: api_pb2.Media):
        kwargs = {k: getattr(media, k) for k in ("fps", "max_frames", "min_pixels", "max_pixels")
                  if media.HasField(k)}
        video = decode_video(media.data, **kwargs)
        p = self.processing
        pixels, grid = to_pixel_values(torch.from_numpy(video.frames), patch_size=p.patch_size,
                                       temporal_patch_size=p.temporal_patch_size, merge_size=p.merge_size,
                                       image_mean=p.image_mean, image_std=p.image_std)
        return pixels, grid, p.temporal_patch_size / video.sample_fps

    def for_request(self, request: api_pb2.GenerateRequest) -> dict:
        """generate's input_ids, attention_mask, mm_token_type_ids and pixel tensors for the request's messages."""
        conversation, images, videos = [], [], []
        for m in request.messages:
            content = []
            for part in m.parts:
                kind = part.WhichOneof("content")
                content.append({"type": "text", "text": part.text} if kind == "text" else {"type": kind})
                if kind == "image":
                    images.append(Image.open(io.BytesIO(part.image.data)))
                elif kind == "video":
                    videos.append(self._video(part.video))
            conversation.append({"role": m.role, "content": content})
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        inputs: dict = {}
        merge = self.config.vision_config.spatial_merge_size ** 2
        if images:
            processed = self.image_processor(images=images, return_tensors="pt")
            inputs.update(pixel_values=processed["pixel_values"], image_grid_thw=processed["image_grid_thw"])
            text = _expand(text, "<|image_pad|>", [int(g.prod()) // merge for g in processed["image_grid_thw"]])
        if videos:
            inputs.update(pixel_values_videos=torch.cat([v[0] for v in videos]),
                          video_grid_thw=torch.tensor([v[1] for v in videos]),
                          second_per_grid_ts=torch.tensor([v[2] for v in videos]))
            text = _expand(text, "<|video_pad|>", [t * h * w // merge for _, (t, h, w), _ in videos])
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        mm_types = torch.zeros_like(ids, dtype=torch.int32)
        mm_types[ids == self.config.image_token_id] = 1
        mm_types[ids == self.config.video_token_id] = 2
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm_types, **inputs)


def _expand(text: str, pad: str, counts: list[int]) -> str:
    """Replaces the i-th placeholder with counts[i] copies, as Qwen2.5-VL's processor does."""
    parts = text.split(pad)
    if len(parts) != len(counts) + 1:  # the text itself holds the placeholder
        raise ValueError(f"prompt: {len(parts) - 1} {pad} placeholders for {len(counts)} media items")
    out = parts[0]
    for n, rest in zip(counts, parts[1:]):
        out += pad * n + rest
    return out
