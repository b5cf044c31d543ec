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


def with_logprobs(request: api_pb2.GenerateRequest, num_top: int = 5) -> api_pb2.GenerateRequest:
    """The request asking for each token's log-probability and the num_top most likely at each step."""
    request.sampling.logprobs, request.sampling.top_logprobs = True, num_top
    return request


def assert_logprobs_match(logprobs: list[api_pb2.TokenLogprobs], expected_tokens: list[int],
                          expected_logits: list[torch.Tensor], *, atol: float, num_top: int = 5,
                          may_part: bool = False) -> int:
    """At every step the chosen token is the reference's, and its log-probability and the num_top most likely
    tokens' equal log_softmax of the reference's raw logits (Reference.generate_scored) within atol. Two tokens
    whose log-probabilities lie within atol may swap places in the top, so each top token is checked by its id.
    may_part: the tokens may part (half precision, at a tie the caller judged with assert_follows); the comparison
    ends there, as what follows has another context. Returns the number of steps compared."""
    assert len(logprobs) == len(expected_tokens), "one log-probability entry per token"
    for step, (entry, want, logits) in enumerate(zip(logprobs, expected_tokens, expected_logits)):
        if entry.chosen.token_id != want:
            assert may_part, f"step {step}: token {entry.chosen.token_id}, transformers chose {want}"
            return step
        expected = torch.log_softmax(logits.float(), -1)
        assert abs(entry.chosen.logprob - float(expected[want])) <= atol, \
            f"step {step}: chosen token's log-probability {entry.chosen.logprob} != {float(expected[want])}"
        top = torch.tensor([t.logprob for t in entry.top])
        assert len(top) == num_top and torch.all(top[:-1] >= top[1:]), f"step {step}: not the {num_top} best, sorted"
        assert torch.allclose(top, expected.topk(num_top).values, atol=atol, rtol=0), f"step {step}: top values differ"
        for t in entry.top:
            assert abs(t.logprob - float(expected[t.token_id])) <= atol, f"step {step}: token {t.token_id}'s differs"
    return len(logprobs)
