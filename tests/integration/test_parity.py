"""Greedy output of the whole pipeline over gRPC equals transformers' generate: the tokens, and at every step the
log-probabilities of the chosen token and the five most likely (float32: within 1e-4)."""

from __future__ import annotations

import concurrent.futures

import pytest

from mmserve.media.samples import make_image, make_video
from tests.integration.helpers import collect, image, request, text, video
from tests.integration.reference import Reference, assert_logprobs_match, with_logprobs

NUM_TOKENS = 32
LOGPROB_ATOL = 1e-4  # float32 on both sides: only summation order differs


@pytest.fixture(scope="module")
def reference(tiny_model):
    return Reference(tiny_model)


@pytest.fixture(scope="module")
def clip() -> bytes:
    return make_video(seconds=2.0, fps=30, width=112, height=84, seed=1)


CASES = {
    "text": lambda clip: request(text("Write a short poem about the sea."), num_tokens=NUM_TOKENS),
    "image": lambda clip: request(image(make_image(width=120, height=90, seed=2)), text("Describe this image."),
                                  num_tokens=NUM_TOKENS),
    "video": lambda clip: request(video(clip), text("What happens in this video?"), num_tokens=NUM_TOKENS),
    "two_images": lambda clip: request(image(make_image(width=64, height=48, fmt="JPEG", seed=3)),
                                       text("and"), image(make_image(width=90, height=120, seed=4)),
                                       text("Compare the two pictures."), num_tokens=NUM_TOKENS),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_transformers(router, reference, clip, case):
    req = with_logprobs(CASES[case](clip))
    result = collect(router, req)
    expected, logits = reference.generate_scored(req, NUM_TOKENS)
    assert len(expected) == NUM_TOKENS
    assert result.token_ids == expected
    assert result.final.completion_tokens == NUM_TOKENS
    assert result.final.finish_reason == "length"
    assert result.text == reference.tokenizer.decode(expected, skip_special_tokens=True)
    assert assert_logprobs_match(result.logprobs, expected, logits, atol=LOGPROB_ATOL) == NUM_TOKENS


def test_eight_requests_in_flight_each_match(router, reference, clip):
    requests = [
        request(text(f"Question number {i}: what is {i} plus {i}?"), num_tokens=NUM_TOKENS) for i in range(4)
    ] + [
        request(image(make_image(width=56 + 28 * i, height=84, seed=10 + i)), text(f"Picture {i}?"),
                num_tokens=NUM_TOKENS) for i in range(2)
    ] + [
        request(video(clip), text(f"Scene {i}: what moves?"), num_tokens=NUM_TOKENS) for i in range(2)
    ]
    requests = [with_logprobs(r) if i % 2 else r for i, r in enumerate(requests)]  # asking beside not asking
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: collect(router, r), requests))
    for req, result in zip(requests, results):
        expected, logits = reference.generate_scored(req, NUM_TOKENS)
        assert result.token_ids == expected
        if req.sampling.logprobs:
            assert_logprobs_match(result.logprobs, expected, logits, atol=LOGPROB_ATOL)
        else:
            assert result.logprobs == []
