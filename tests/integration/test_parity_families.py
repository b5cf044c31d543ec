"""Qwen3-VL and InternVL through the whole stack (decoder, two encoders, llm and router as processes, the embedding
cache in a real redis-server): at every step the chosen token and the top-5 log-probabilities equal transformers'
generate of the family's own class on the same checkpoint and the same preprocessed media, in float32.

The reference preprocesses the request's bytes in this process with the family's own code (its images proved equal
to transformers' processors, max abs diff 0.0, in tests/unit/test_family_*.py; its videos to the processors' rules),
so what is checked here is everything between: the decoder's planning and frames, the encoders' chunks, packing
and DeepStack columns, timestamps, the cache, the llm's splice and positions, and the router's plumbing.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoTokenizer

from mmserve.media.samples import make_image, make_video
from mmserve.media.video import decode_video, probe_video
from mmserve.models.family import family_of
from mmserve.models.internvl.tiny import build as build_internvl
from mmserve.models.qwen3_vl.tiny import build as build_qwen3_vl
from mmserve.v1 import api_pb2
from tests.integration.cluster import Cluster
from tests.integration.helpers import collect, image, text, video
from tests.integration.reference import assert_logprobs_match, with_logprobs
from tests.unit.family_parity import hf_generate_inputs, our_prompt

NUM_TOKENS = 12
FAMILIES = {"qwen3_vl": build_qwen3_vl, "internvl": build_internvl}
PICTURE = make_image(width=120, height=90, seed=2)
OTHER = make_image(width=300, height=160, fmt="JPEG", seed=3)
CLIP = make_video(seconds=3.0, fps=10, width=128, height=96, seed=1)


@dataclasses.dataclass
class Served:
    family: object
    model: torch.nn.Module  # transformers' full model of the family: the reference
    tokenizer: object
    cluster: Cluster
    router: object

    def media(self, part: api_pb2.Part):
        """(pixels, item) of one media part, preprocessed by the family in this process."""
        kind = part.WhichOneof("content")
        data = getattr(part, kind).data
        if kind == "image":
            return self.family.preprocess_image(Image.open(io.BytesIO(data)))
        info = probe_video(data)
        plan = self.family.plan_decode("video", self.family.default_params("video"), info.height, info.width,
                                       info.total_frames, info.fps)
        frames = torch.from_numpy(decode_video(data, indices=list(plan.frame_indices), size=(info.height, info.width)).frames)
        return self.family.preprocess_video(frames, list(plan.frame_indices), info.fps)

    @torch.inference_mode()
    def generate(self, request: api_pb2.GenerateRequest) -> tuple[list[int], list[torch.Tensor]]:
        """transformers' greedy tokens and the raw logits each was chosen from."""
        media = [self.media(part) for m in request.messages for part in m.parts if part.WhichOneof("content") != "text"]
        chat = [{"role": m.role, "content": [{"type": "text", "text": part.text} if part.WhichOneof("content") == "text"
                                             else {"type": part.WhichOneof("content")} for part in m.parts]}
                for m in request.messages]
        ids = our_prompt(self.family, self.tokenizer, chat, [item for _, item in media])
        out = self.model.generate(**hf_generate_inputs(self.family, ids, media), do_sample=False,
                                  max_new_tokens=NUM_TOKENS, min_new_tokens=NUM_TOKENS, output_logits=True,
                                  return_dict_in_generate=True)
        return out.sequences[0, len(ids):].tolist(), [step[0].float() for step in out.logits]

    def assert_matches(self, request: api_pb2.GenerateRequest, result=None) -> None:
        result = result or collect(self.router, request)
        tokens, logits = self.generate(request)
        assert result.token_ids == tokens
        assert_logprobs_match(result.logprobs, tokens, logits, atol=1e-4)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def served(request, tmp_path_factory, redis_server):
    checkpoint = FAMILIES[request.param](tmp_path_factory.mktemp(request.param), seed=0)
    # One decoder whose two workers cut even a short clip into chunks, spread over two encoders; float32 throughout.
    cluster = Cluster(checkpoint, redis_server, counts={"decoder": 1, "encoder": 2, "llm": 1}, registry=False,
                      stage_options={"decoder": dict(num_workers=2, min_chunk_cost=0, device="cpu"),
                                     "encoder": dict(dtype="float32"),
                                     "llm": dict(dtype="float32", redis_url=redis_server.url)})
    cluster.start_all()
    stub, channel = cluster.stub()
    try:
        yield Served(family_of(checkpoint), AutoModelForImageTextToText.from_pretrained(checkpoint).eval(),
                     AutoTokenizer.from_pretrained(checkpoint), cluster, stub)
    finally:
        channel.close()
        cluster.stop()


def ask(*turns: tuple[str, list[api_pb2.Part]]) -> api_pb2.GenerateRequest:
    """A greedy request of NUM_TOKENS tokens with their log-probabilities."""
    return with_logprobs(api_pb2.GenerateRequest(
        messages=[api_pb2.Message(role=role, parts=parts) for role, parts in turns],
        sampling=api_pb2.SamplingParams(max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS, temperature=0.0)))


CASES = {
    "text": lambda: ask(("user", [text("Tell me a story.")])),
    "image": lambda: ask(("user", [image(PICTURE), text("Describe.")])),
    "two_images": lambda: ask(("user", [image(PICTURE), text("and"), image(OTHER), text("Compare.")])),
    "video": lambda: ask(("user", [video(CLIP), text("What happens?")])),
    "image_video": lambda: ask(("user", [image(PICTURE), video(CLIP), text("Compare.")])),
    "video_image": lambda: ask(("user", [video(CLIP), image(OTHER), text("Compare.")])),
    "multi_turn": lambda: ask(("system", [text("You are terse.")]), ("user", [image(PICTURE), text("What?")]),
                              ("assistant", [text("A dog.")]), ("user", [text("Why?")])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_prompt_equals_transformers_generate(served, case):
    served.assert_matches(CASES[case]())


def test_eight_requests_in_flight_and_cache_hits_with_new_questions_equal_transformers_generate(served):
    # The media were all seen above (cache hits, each with a new question) and are asked for again at once.
    requests = [ask(("user", [image(PICTURE), text(f"Question {i}?")])) for i in range(3)] + [
        ask(("user", [video(CLIP), text(f"Scene {i}?")])) for i in range(3)] + [
        ask(("user", [image(make_image(width=64 + 32 * i, height=80, seed=30 + i)), text("New?")])) for i in range(2)]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: collect(served.router, r), requests))
    for req, result in zip(requests, results):
        served.assert_matches(req, result)
