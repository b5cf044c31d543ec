"""Greedy, temperature, top-k and top-p sampling for the whole batch at once, with per-request seeded generators,
and the log-probabilities of the sampled tokens for the rows that ask for them."""

from __future__ import annotations

import dataclasses

import torch

from services.llm.sequence import SamplingOptions


def sample_rows(logits: torch.Tensor, options: list[SamplingOptions],
                generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of logits [rows, vocab]: greedy rows by one argmax, the others drawn together."""
    tokens = logits.argmax(-1)
    drawn = [row for row, o in enumerate(options) if not o.is_greedy]
    if drawn:
        probs = filtered_probs(logits[drawn], [options[row] for row in drawn])
        # One uniform number per row from the request's own generator: a seeded request draws the same
        # tokens whatever else shares its batch.
        uniform = torch.tensor([float(torch.rand((), dtype=torch.float64, generator=generators[row]))
                                for row in drawn], dtype=torch.float64)
        tokens[drawn] = invert_cdf(probs, uniform)
    return tokens.tolist()


def filtered_probs(logits: torch.Tensor, options: list[SamplingOptions]) -> torch.Tensor:
    """Unnormalised probabilities [rows, vocab] after each row's temperature, top-k and top-p."""
    vocab = logits.shape[-1]
    temperature = torch.tensor([o.temperature for o in options], dtype=logits.dtype)
    logits = logits / temperature[:, None]
    top_k = torch.tensor([o.top_k if o.top_k and o.top_k < vocab else vocab for o in options])
    sorted_logits, order = logits.sort(-1, descending=True)
    kth = sorted_logits.gather(1, (top_k - 1)[:, None])
    probs = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least one token); rows at 1.0 keep all.
    top_p = torch.tensor([o.top_p if o.top_p < 1.0 else float("inf") for o in options], dtype=probs.dtype)
    sorted_probs = probs.gather(1, order)
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p[:, None]
    return probs.scatter(1, order, sorted_probs.masked_fill_(drop, 0.0))


def invert_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The token of each row [rows, vocab] whose cumulative mass first exceeds uniform [rows] of the row's total."""
    cdf = probs.double().cumsum(-1)
    picked = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]
    # Rounding can carry a draw of almost 1 past the end: it belongs to the last token with mass.
    last = (probs > 0).long().cumsum(-1).argmax(-1)
    return torch.minimum(picked, last)


def make_generator(seed: int | None) -> torch.Generator:
    """A generator seeded from the request (same seed → same draws) or from the OS."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log-probability under the model, and the step's most likely (token, log-probability)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def model_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [rows, vocab] of the model's own distribution: log_softmax of the float32 logits, before
    temperature and filters, as OpenAI and vLLM report them."""
    return logits.float().log_softmax(-1)


def token_logprobs(log_probs: torch.Tensor, tokens: list[int], num_top: list[int]) -> list[TokenLogprobs]:
    """Each row's token and its num_top most likely tokens, from log-probabilities [rows, vocab]; one topk for all
    the rows."""
    chosen = log_probs.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()
    k = min(max(num_top), log_probs.shape[-1])
    values, ids = log_probs.topk(k, -1)
    return [TokenLogprobs(token, logprob, list(zip(row_ids[:n], row_values[:n])))
            for token, logprob, row_ids, row_values, n in zip(tokens, chosen, ids.tolist(), values.tolist(), num_top)]
