"""Router cost models in plain Python: online non-negative least squares, decode, encode, prefill and step
costs, media shapes."""

from __future__ import annotations

import pytest

from mmserve.online_linear import OnlineLinear
from services.router.costs import CostSeeds, DecodeCost, MediaShape, ShapeEstimator, TokenCost


def test_online_linear_starts_at_the_seed_and_converges_to_the_truth():
    model = OnlineLinear([10.0, 1.0])
    assert model.predict([1, 100]) == pytest.approx(110.0)
    for n in range(200):
        tokens = 50 + (n * 37) % 400
        model.update([1, tokens], 3.0 + 0.25 * tokens)
    assert model.predict([1, 1000]) == pytest.approx(253.0, rel=0.02)


def test_online_linear_follows_a_replica_that_slows_down():
    model = TokenCost(1.0, 0.1)
    for _ in range(100):
        model.observe(100, 11.0)
    for _ in range(100):
        model.observe(100, 33.0)  # three times slower now
    assert model.predict(100) == pytest.approx(33.0, rel=0.05)


def test_weights_stay_non_negative_when_the_data_suggest_a_negative_slope():
    model = TokenCost(5.0, 0.05)
    for n in range(100):
        tokens = 16 if n % 2 else 4000
        model.observe(tokens, 50.0 if tokens == 16 else 20.0)  # small inputs slower than large ones
    assert min(model.model.weights) >= 0.0
    assert 20.0 <= model.predict(2000) <= 50.0


def test_stalls_do_not_wind_the_fit_up():
    """A replica stalling for a minute now and then: the fit may rise, but never past what was observed, and it
    comes back once the stalls end (recursive least squares with clipped weights predicted 690 s here)."""
    model = TokenCost(5.0, 0.05)
    truth = lambda tokens: 5.0 + 0.01 * tokens  # noqa: E731
    for n in range(400):
        tokens = (16, 256, 4000, 1024)[n % 4]
        stalled = n % 7 == 0 and n < 300
        model.observe(tokens, 60_000.0 if stalled else truth(tokens))
        assert max(model.predict(t) for t in (1, 16, 256, 4000, 8000)) <= 2 * 60_000.0
    assert model.predict(16) == pytest.approx(truth(16), rel=0.2)
    assert model.predict(4000) == pytest.approx(truth(4000), rel=0.2)


def test_decode_cost_learns_per_frame_and_per_pixel():
    cost = DecodeCost(CostSeeds())
    for frames in (4, 8, 16, 32, 64):
        for mp in (0.1, 0.5, 1.0):
            cost.observe(frames, frames * mp * 1e6, 20 + 3 * frames + 10 * frames * mp)
    assert cost.predict(48, 48 * 0.75e6) == pytest.approx(20 + 3 * 48 + 10 * 48 * 0.75, rel=0.05)


def test_shape_estimator_is_exact_for_media_seen_before_and_scales_by_size_otherwise():
    shapes = ShapeEstimator(patch_size=14)
    assert shapes.estimate("video", "a", 2_000_000, max_frames=768, max_pixels=1e6) == MediaShape(0, 0, 0)
    seen = MediaShape(32, 32 * 200_000, 32 * 1000)
    shapes.observe("video", "a", 2_000_000, seen)
    assert shapes.estimate("video", "a", 2_000_000, max_frames=768, max_pixels=1e6) == seen
    bigger = shapes.estimate("video", "b", 4_000_000, max_frames=768, max_pixels=1e6)
    assert bigger.num_frames == pytest.approx(64)
    capped = shapes.estimate("video", "c", 4_000_000, max_frames=40, max_pixels=1e6)
    assert capped.num_frames == 40


# Admission -----------------------------------------------------------------------------------------


def test_step_cost_fitted_at_batch_one_survives_outliers():
    # An idle llm steps at batch 1 for a long time; a few slow steps (a busy machine) must not throw the
    # per-sequence slope off and make every larger batch look hopeless.
    model = TokenCost(5.0, 0.2)
    for n in range(2000):
        model.observe(1, 200.0 if n % 20 == 7 else 2.0)
    assert model.predict(1) < 10.0
    assert model.predict(32) < 40.0
    assert all(w >= 0 for w in model.model.weights)


def test_step_cost_still_learns_a_real_slope_after_a_long_batch_one_stretch():
    model = TokenCost(5.0, 0.2)
    for _ in range(500):
        model.observe(1, 2.0 + 0.5)
    for n in range(300):
        batch = 1 + n % 32
        model.observe(batch, 2.0 + 0.5 * batch)
    assert model.predict(32) == pytest.approx(18.0, rel=0.1)
