"""The correctness bar: transformers' own generate on the same checkpoint and preprocessed inputs."""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from mmserve.hf_inputs import HfInputs
from mmserve.v1 import api_pb2


class Reference:
    """Greedy token ids from Qwen2_5_VLForConditionalGeneration.generate."""

    def __init__(self, model_dir, dtype: torch.dtype | None = None):
        # None: the checkpoint's own dtype, as transformers loads it by default.
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype or "auto").eval()
        self.inputs = HfInputs(model_dir, self.model.config)
        self.tokenizer = self.inputs.tokenizer

    @torch.inference_mode()
    def generate(self, request: api_pb2.GenerateRequest, num_tokens: int) -> list[int]:
        inputs = self.inputs.for_request(request)
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=num_tokens, min_new_tokens=num_tokens)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    @torch.inference_mode()
    def generate_scored(self, request: api_pb2.GenerateRequest,
                        num_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
        """Greedy token ids and the raw logits [vocab] (float32) each was chosen from."""
        inputs = self.inputs.for_request(request)
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                                  output_logits=True, return_dict_in_generate=True)
        return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), [step[0].float() for step in out.logits]
