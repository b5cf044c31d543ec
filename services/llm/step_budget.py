"""How many prompt tokens one engine step may prefill beside its decodes (plain Python, no torch)."""

from __future__ import annotations

from mmserve.online_linear import OnlineLinear
from services.llm.sequence import Sequence


class StepBudget:
    """Keeps each sequence with a time-per-token target on schedule while prompts are prefilled beside it.

    A step's prompt chunks delay every sequence decoding in it. Under a token budget alone (2,048) the steps that
    carried a video's prompt took 144-229 ms on `small` beside 13 ms for the decodes alone, and a sequence that met
    one or two of them missed a 53 ms target on average over its 16 tokens, while the admission that let it in had
    priced the average step. A time per token is an average: it is met when output token k (the first is 0) is out
    by k times the target after the first. So a step prefills only what the time model says fits before the
    earliest such due time among the sequences decoding in it, each due time at `share` of the target (the rest
    is kept for what the model does not see: noise, the way to the client), and at least min_tokens, so prompts
    always advance. A sequence ahead of its schedule (steps shorter than its target, the usual case below
    capacity) leaves long chunks room, at most max_ahead_tokens of its tokens' worth, so that a long answer's
    banked time is not spent in one stall (a 600-word prompt beside decodes 20 s into their answers made a 259 ms
    gap between two tokens); one behind leaves the minimum. The rest of a prompt waits for the next
    step, where its time counts towards the prompt's own first token (whose target is the looser one). With no
    target among the decoding sequences the token budget alone holds.

    The time model is fitted online from the steps the engine runs: ms ≈ fixed + per decoding sequence × their
    number + per prompt token × the tokens prefilled (OnlineLinear), so it measures this device under its
    present load.
    """

    def __init__(self, max_tokens: int, *, share: float = 0.75, min_tokens: int = 32, max_ahead_tokens: float = 4.0,
                 seed: tuple[float, float, float] = (5.0, 0.2, 0.1), half_life: float = 64.0):
        self.max_tokens, self.share, self.min_tokens = max_tokens, share, min(min_tokens, max_tokens)
        self.max_ahead_tokens = max_ahead_tokens
        self.model = OnlineLinear(list(seed), half_life=half_life)

    def observe(self, num_decoding: int, num_prefill_tokens: int, ms: float) -> None:
        """One step that ran: how many sequences it decoded, how many prompt tokens it prefilled, how long it took."""
        self.model.update([1.0, num_decoding, num_prefill_tokens], ms)

    def predict_ms(self, num_decoding: int, num_prefill_tokens: int) -> float:
        return self.model.predict([1.0, num_decoding, num_prefill_tokens])

    def time_left_ms(self, decoding: list[Sequence], now: float) -> float | None:
        """Until the earliest due time of the next token among the decoding sequences with a target, each at most
        max_ahead_tokens of its tokens' worth away (None: no target); now on the clock of their first_token_at
        (seconds)."""
        return min((min(self.share * seq.tpot_ms * seq.num_output_tokens - (now - seq.first_token_at) * 1e3,
                        self.share * seq.tpot_ms * self.max_ahead_tokens)
                    for seq in decoding if seq.tpot_ms > 0), default=None)

    def prefill_tokens(self, decoding: list[Sequence], now: float) -> int:
        """Prompt tokens a step beside these decoding sequences may take."""
        time_left_ms, ms_per_token = self.time_left_ms(decoding, now), self.model.weights[2]
        if time_left_ms is None or self.share <= 0 or ms_per_token <= 0:
            return self.max_tokens
        room_ms = time_left_ms - self.predict_ms(len(decoding), 0)
        return int(min(self.max_tokens, max(self.min_tokens, room_ms / ms_per_token)))
