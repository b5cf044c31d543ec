"""Batched sampling: each row filtered and drawn as it would be alone, whatever shares its batch."""

from __future__ import annotations

import torch

from services.llm.sampler import (filtered_probs, invert_cdf, make_generator, model_logprobs, sample_rows,
                                  token_logprobs)
from services.llm.sequence import SamplingOptions

OPTIONS = [
    SamplingOptions(temperature=0.0),
    SamplingOptions(temperature=0.7),
    SamplingOptions(temperature=1.3, top_k=5),
    SamplingOptions(temperature=1.0, top_p=0.6),
    SamplingOptions(temperature=0.5, top_k=40, top_p=0.9),
    SamplingOptions(temperature=1.0, top_k=1),
]


def one_row_probs(logits: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """The filter one row at a time, as the sampler drew before it was batched."""
    logits = logits / options.temperature
    if options.top_k and options.top_k < logits.shape[-1]:
        kth = torch.topk(logits, options.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if options.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= options.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs


def test_batched_filter_equals_each_row_alone():
    logits = torch.randn(len(OPTIONS) - 1, 200, generator=torch.Generator().manual_seed(0)) * 3
    options = OPTIONS[1:]
    batched = filtered_probs(logits, options)
    for row, o in enumerate(options):
        torch.testing.assert_close(batched[row], one_row_probs(logits[row], o), rtol=1e-6, atol=1e-7)


def test_a_seeded_row_draws_the_same_tokens_alone_and_in_any_batch():
    logits = torch.randn(len(OPTIONS), 300, generator=torch.Generator().manual_seed(1)) * 2

    def draws(rows: list[int], steps: int = 20) -> dict[int, list[int]]:
        generators = [make_generator(100 + row) for row in rows]
        picked = [sample_rows(logits[rows], [OPTIONS[r] for r in rows], generators) for _ in range(steps)]
        return {row: [step[i] for step in picked] for i, row in enumerate(rows)}

    together = draws(list(range(len(OPTIONS))))
    for row in range(len(OPTIONS)):
        assert draws([row])[row] == together[row]
    assert draws([2, 4, 1]) == {row: together[row] for row in (2, 4, 1)}
    greedy = logits.argmax(-1).tolist()
    assert together[0] == [greedy[0]] * 20 and together[5] == [greedy[5]] * 20  # temperature 0, top_k=1
    assert len(set(together[1])) > 1, "temperature 0.7 over 300 tokens draws more than one"
    top5 = set(logits[2].topk(5).indices.tolist())
    assert set(together[2]) <= top5


def test_inverting_the_cdf_never_picks_a_token_without_mass():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    assert invert_cdf(probs, torch.tensor([0.0, 0.0], dtype=torch.float64)).tolist() == [1, 2]
    assert invert_cdf(probs, torch.tensor([0.49, 0.5], dtype=torch.float64)).tolist() == [1, 2]
    assert invert_cdf(probs, torch.tensor([1.0, 1.0], dtype=torch.float64)).tolist() == [3, 2]


def test_logprobs_are_the_models_log_softmax_whatever_the_row_samples_with():
    logits = torch.randn(len(OPTIONS), 300, generator=torch.Generator().manual_seed(2)) * 4
    generators = [make_generator(7) for _ in OPTIONS]
    tokens = sample_rows(logits.clone(), OPTIONS, generators)
    num_top = [0, 1, 5, 20, 300, 1000]  # more than the vocabulary: all of it
    picked = token_logprobs(model_logprobs(logits), tokens, num_top)
    expected = torch.log_softmax(logits.double(), -1)
    for row, (token, lp) in enumerate(zip(tokens, picked)):
        assert lp.token_id == token
        assert abs(lp.logprob - float(expected[row, token])) < 1e-5, f"row {row}: not the raw distribution's"
        assert len(lp.top) == min(num_top[row], 300)
        top_ids = [token_id for token_id, _ in lp.top]
        assert top_ids == expected[row].topk(len(top_ids)).indices.tolist()
        for token_id, logprob in lp.top:
            assert abs(logprob - float(expected[row, token_id])) < 1e-5


def test_logprobs_of_rows_taken_apart_equal_those_taken_together():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    together = token_logprobs(model_logprobs(logits), [1, 2, 3], [2, 0, 4])
    alone = [token_logprobs(model_logprobs(logits[[row]]), [row + 1], [n])[0] for row, n in enumerate([2, 0, 4])]
    assert together == alone
