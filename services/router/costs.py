"""Per-replica cost models of each stage, fitted online from what the replicas report (plain Python)."""

from __future__ import annotations

import dataclasses

from mmserve.online_linear import OnlineLinear


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


def encode_work_ms(reply) -> float:
    """What an encoder's reply says its item cost it: its own work, not its wait behind others (the backlog prices
    that); an encoder older than the field reports only the whole time."""
    return reply.work_ms or reply.encode_ms


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


class SharedCost:
    """One role's cost model on a unified replica: the inner model learns the role's cost with the device to
    itself (each observation divided by the other role's load factor then), predictions are multiplied by it now."""

    def __init__(self, inner, factor):
        self.inner = inner
        self.factor = factor  # () -> float, from the other role's replica as the router sees it now

    def predict(self, *features: float) -> float:
        return self.inner.predict(*features) * self.factor()

    def observe(self, *features_then_ms: float) -> None:
        *features, ms = features_then_ms
        self.inner.observe(*features, ms / self.factor())


class SharedDevice:
    """How the two roles of a unified replica load each other (the replica's arbiter, services/unified, as priced
    here). Taking turns: decode steps first, within max_decode_slowdown of their time alone; the encoder in what
    is left. Overlapping (overlap_share > 0): while both have work the encoder runs on overlap_share of the cores
    and the llm on the rest, each slowed by its share alone."""

    def __init__(self, max_decode_slowdown: float, overlap_share: float = 0.0):
        self.slowdown = max_decode_slowdown
        self.overlap_share = overlap_share

    def encode_factor(self, llm) -> float:
        """While the llm there has streams in flight the encoder gets 1 - 1/slowdown (or its share) of the device."""
        if not llm.num_in_flight:
            return 1.0
        return 1.0 / self.overlap_share if self.overlap_share else self.slowdown / (self.slowdown - 1.0)

    def step_factor(self, encoder) -> float:
        """While the encoder there has calls in flight each decode step may take up to slowdown times longer
        (overlapping: the steps run on the other cores)."""
        if not encoder.num_in_flight:
            return 1.0
        return 1.0 / (1.0 - self.overlap_share) if self.overlap_share else self.slowdown

    def prefill_factor(self, encoder) -> float:
        """Prefill chunks and encoder slices take turns: about twice as long while both have work (overlapping:
        the chunks run on the other cores)."""
        if not encoder.num_in_flight:
            return 1.0
        return 1.0 / (1.0 - self.overlap_share) if self.overlap_share else 2.0

    def share(self, encoder, llm) -> None:
        """Makes the cost models of a unified replica's two roles (the pools' Replica objects) price each other."""
        encoder.costs = SharedCost(encoder.costs, lambda: self.encode_factor(llm))
        llm.costs.prefill = SharedCost(llm.costs.prefill, lambda: self.prefill_factor(encoder))
        llm.costs.step = SharedCost(llm.costs.step, lambda: self.step_factor(encoder))
