"""Greedy, temperature, top-k and top-p sampling with per-request seeded generators."""

from __future__ import annotations

import torch

from services.llm.sequence import SamplingOptions


def sample_rows(logits: torch.Tensor, options: list[SamplingOptions],
                generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of logits [rows, vocab]: every greedy row in one argmax, the others drawn."""
    greedy = [row for row, o in enumerate(options) if o.is_greedy]
    tokens = dict(zip(greedy, logits[greedy].argmax(-1).tolist()))
    for row, (o, generator) in enumerate(zip(options, generators)):
        if not o.is_greedy:
            tokens[row] = _draw(logits[row], o, generator)
    return [tokens[row] for row in range(len(options))]


def _draw(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None) -> int:
    """Draws one token from a row of logits [vocab] with temperature, top-k and top-p."""
    logits = logits / options.temperature
    if options.top_k and options.top_k < logits.shape[-1]:
        kth = torch.topk(logits, options.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if options.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= options.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None) -> torch.Generator:
    """A generator seeded from the request (same seed → same draws) or from the OS."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
