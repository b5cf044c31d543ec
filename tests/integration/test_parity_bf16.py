"""In bfloat16 (what real checkpoints ship, and what `--dtype auto` computes in where the CPU has it in hardware)
the whole pipeline follows transformers' generate, log-probabilities included (within BF16_ULPS, below). Kernels
round differently, so greedy tokens may part where transformers' own two best logits lie within rounding of each
other, and either token is right; before that point they must be equal, and a parting anywhere else fails."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

from stack.launcher import StackSpec, plan
from stack.ports import free_port
from mmserve.media.samples import make_image, make_video
from mmserve.models import loading
from mmserve.models.tiny import build_tiny_model
from tests.conftest import RELAXED_SLOS
from tests.integration.helpers import assert_follows, collect, image, request, router_stub, running, text, video
from tests.integration.reference import Reference, assert_logprobs_match, with_logprobs

pytestmark = pytest.mark.skipif(torch.bfloat16 not in loading.native_dtypes(torch.device("cpu")),
                                reason="this CPU has no native bfloat16: --dtype auto computes in float32 here")
NUM_TOKENS = 32
TIE = 0.02  # two logits within this share of the step's largest |logit| are a tie in bfloat16
# bfloat16 keeps 8 significant bits, so the two sides' kernels may round a logit of magnitude m apart by a unit in
# the last place (at most m * 2**-7), and a log-probability moves with its logit. Measured on these cases: at most
# 0.016 with the largest |logit| about 2, i.e. one such unit; the bound allows two.
BF16_ULPS = 2


def logprob_atol(logits: list[torch.Tensor]) -> float:
    """The log-probability tolerance of a request: BF16_ULPS units in the last place of its largest |logit|."""
    return BF16_ULPS * 2**-7 * max(float(step.abs().max()) for step in logits)


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bf16"), seed=0, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def bf16_router(bf16_model, redis_server):
    # Relaxed targets: this test is about numbers, not admission (a busy machine once got a refusal here).
    planned = plan(StackSpec(model=str(bf16_model), port=free_port(), redis_url=redis_server.url,
                             log_level="WARNING", router_args=RELAXED_SLOS))
    children, address = planned.children(), planned.router_address
    with running(children), router_stub(address) as stub:
        yield stub


@pytest.fixture(scope="module")
def reference(bf16_model):
    ref = Reference(bf16_model)
    assert ref.model.dtype == torch.bfloat16
    return ref


def cases():
    clip = make_video(seconds=2.0, fps=30, width=112, height=84, seed=1)
    return [with_logprobs(r) for r in [
        request(text("Write a short poem about the sea."), num_tokens=NUM_TOKENS),
        request(image(make_image(width=120, height=90, seed=2)), text("Describe this image."), num_tokens=NUM_TOKENS),
        request(video(clip), text("What happens in this video?"), num_tokens=NUM_TOKENS),
    ] + [request(text(f"Question number {i}: what is {i} plus {i}?"), num_tokens=NUM_TOKENS) for i in range(5)]]


def test_lone_and_batched_requests_follow_transformers(bf16_router, reference):
    requests = cases()
    expected = [reference.generate_scored(r, NUM_TOKENS) for r in requests]
    assert all(len(want) == NUM_TOKENS for want, _ in expected)
    lone = [collect(bf16_router, req) for req in requests[:3]]  # one at a time
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:  # all in flight together
        results = lone + list(pool.map(lambda r: collect(bf16_router, r), requests))
    for result, (want, logits) in zip(results, expected[:3] + expected):
        assert_follows(result.token_ids, want, logits, tie=TIE)
        assert_logprobs_match(result.logprobs, want, logits, atol=logprob_atol(logits), may_part=True)
