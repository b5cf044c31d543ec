"""Per-replica cost models of each stage, fitted online from what the replicas report (plain Python)."""

from __future__ import annotations

import dataclasses


class OnlineLinear:
    """ms ≈ w · features, fitted by recursive least squares with forgetting; starts from a seeded guess.

    Forgetting (lam < 1) lets the fit follow a replica whose speed changes (load, thermal, a new GPU);
    the seed is what a warm-up profile measured, so the first predictions are already sensible.

    Live traffic often varies one feature only (an idle llm steps at batch 1 for minutes), and forgetting
    then inflates the covariance along the directions nothing measures (RLS wind-up): one slow step on a
    busy machine would throw the per-sequence slope anywhere, and the router would refuse everything.
    So the covariance is capped at its starting size, each observation moves the fit by at most a few
    times the current prediction (a stall is an outlier, a slower replica shows over several updates),
    and no weight goes negative (every feature costs time).
    """

    def __init__(self, seed: list[float], *, lam: float = 0.97, trust: float = 10.0, max_error_ratio: float = 2.0,
                 min_error_ms: float = 5.0):
        self.weights = list(seed)
        n = len(seed)
        # Small initial covariance: the seed counts as a few observations' worth of evidence.
        self._p = [[trust if i == j else 0.0 for j in range(n)] for i in range(n)]
        self.trust = trust
        self.lam = lam
        self.max_error_ratio = max_error_ratio
        self.min_error_ms = min_error_ms
        self.num_updates = 0

    def predict(self, features: list[float]) -> float:
        """Predicted milliseconds, never negative."""
        return max(0.0, sum(w * x for w, x in zip(self.weights, features)))

    def update(self, features: list[float], observed_ms: float) -> None:
        """One RLS step towards an observation."""
        n = len(self.weights)
        px = [sum(self._p[i][j] * features[j] for j in range(n)) for i in range(n)]
        denom = self.lam + sum(features[i] * px[i] for i in range(n))
        gain = [v / denom for v in px]
        predicted = sum(w * x for w, x in zip(self.weights, features))
        limit = max(self.min_error_ms, self.max_error_ratio * abs(predicted))
        error = min(limit, max(-limit, observed_ms - predicted))
        self.weights = [max(0.0, w + g * error) for w, g in zip(self.weights, gain)]
        self._p = [[(self._p[i][j] - gain[i] * px[j]) / self.lam for j in range(n)] for i in range(n)]
        # Anti-windup: no weight is ever less certain than at the start (P -> D P D shrinks only those).
        d = [min(1.0, (self.trust / self._p[i][i]) ** 0.5) if self._p[i][i] > 0 else 1.0 for i in range(n)]
        self._p = [[d[i] * self._p[i][j] * d[j] for j in range(n)] for i in range(n)]
        self.num_updates += 1


@dataclasses.dataclass
class CostSeeds:
    """Starting guesses (ms), replaced by the warm-up profile and then by live measurements."""

    decode_ms: float = 5.0  # fixed cost of one decode call
    decode_ms_per_frame: float = 2.0
    decode_ms_per_mpixel: float = 4.0
    encode_ms: float = 5.0
    encode_ms_per_token: float = 0.05  # per vision patch before the spatial merge
    prefill_ms: float = 5.0
    prefill_ms_per_token: float = 0.05
    step_ms: float = 5.0  # one decode step of the llm
    step_ms_per_seq: float = 0.2


def decode_features(num_frames: float, num_pixels: float) -> list[float]:
    return [1.0, num_frames, num_pixels / 1e6]


def tokens_features(num_tokens: float) -> list[float]:
    return [1.0, num_tokens]


class DecodeCost:
    """Decode ms per call, per frame and per megapixel of output."""

    def __init__(self, seeds: CostSeeds):
        self.model = OnlineLinear([seeds.decode_ms, seeds.decode_ms_per_frame, seeds.decode_ms_per_mpixel])

    def predict(self, num_frames: float, num_pixels: float) -> float:
        return self.model.predict(decode_features(num_frames, num_pixels))

    def observe(self, num_frames: float, num_pixels: float, ms: float) -> None:
        self.model.update(decode_features(num_frames, num_pixels), ms)


class TokenCost:
    """A fixed cost plus a cost per token: encode (vision patches) and prefill (prompt tokens)."""

    def __init__(self, fixed_ms: float, ms_per_token: float):
        self.model = OnlineLinear([fixed_ms, ms_per_token])

    def predict(self, num_tokens: float) -> float:
        return self.model.predict(tokens_features(num_tokens))

    def observe(self, num_tokens: float, ms: float) -> None:
        self.model.update(tokens_features(num_tokens), ms)


def encode_cost(seeds: CostSeeds) -> TokenCost:
    return TokenCost(seeds.encode_ms, seeds.encode_ms_per_token)


def prefill_cost(seeds: CostSeeds) -> TokenCost:
    return TokenCost(seeds.prefill_ms, seeds.prefill_ms_per_token)


def step_cost(seeds: CostSeeds) -> TokenCost:
    """Decode step ms by batch size (the "tokens" are running sequences)."""
    return TokenCost(seeds.step_ms, seeds.step_ms_per_seq)


@dataclasses.dataclass(frozen=True)
class MediaShape:
    """What one media item costs downstream: frames and pixels to decode, vision patches to encode."""

    num_frames: float
    num_pixels: float  # all frames together, after resizing
    num_patches: float  # vision tokens before the spatial merge (merged: / 4)


class ShapeEstimator:
    """Predicts a media item's shape before it is decoded: exact for media seen before, else per byte.

    Frames and pixels follow the encoded size only loosely; the request's caps bound the guess, and the
    exact shape replaces it as soon as the item has been decoded once (repeats are the common case).
    """

    def __init__(self, patch_size: int, max_entries: int = 4096):
        self.patch_size = patch_size
        self._seen: dict[str, MediaShape] = {}
        self._per_mb: dict[str, MediaShape] = {}
        self.max_entries = max_entries

    def estimate(self, kind: str, digest: str, num_bytes: int, *, max_frames: float,
                 max_pixels: float) -> MediaShape:
        if (shape := self._seen.get(digest)) is not None:
            return shape
        mb = max(num_bytes / 1e6, 0.01)
        rate = self._per_mb.get(kind)
        if rate is None:  # nothing learned yet: price nothing rather than refuse on a wild guess
            return MediaShape(0.0, 0.0, 0.0)
        frames = 1.0 if kind == "image" else min(max_frames, max(2.0, rate.num_frames * mb))
        pixels = min(frames * max_pixels, rate.num_pixels * mb)
        return MediaShape(frames, pixels, min(rate.num_patches * mb, pixels / self.patch_size ** 2))

    def observe(self, kind: str, digest: str, num_bytes: int, shape: MediaShape) -> None:
        if len(self._seen) >= self.max_entries:
            self._seen.pop(next(iter(self._seen)))
        self._seen[digest] = shape
        mb = max(num_bytes / 1e6, 0.01)
        sample = MediaShape(shape.num_frames / mb, shape.num_pixels / mb, shape.num_patches / mb)
        old = self._per_mb.get(kind)
        self._per_mb[kind] = sample if old is None else MediaShape(
            *(0.8 * a + 0.2 * b for a, b in zip(dataclasses.astuple(old), dataclasses.astuple(sample))))


class LlmCosts:
    """An llm replica's prefill cost by prompt tokens and decode step cost by running sequences."""

    def __init__(self, seeds: CostSeeds):
        self.prefill = prefill_cost(seeds)
        self.step = step_cost(seeds)
