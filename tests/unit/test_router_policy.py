"""Router policy in plain Python: admission, calibration, least-slack ordering (replica pools: test_replica_pool)."""

from __future__ import annotations

import dataclasses
import time

import pytest

from services.router.admission import Controller
from services.router.costs import CostSeeds, DecodeCost, LlmCosts, MediaShape
from services.router.policy import (Backlog, Calibration, Prediction, SlackQueue, Slo, SloDefaults, StageTimes,
                                    Strictness, decide, degraded_frames)
from tests.unit.test_replica_pool import make_pool


def prediction(media_wait=0.0, media_work=0.0, llm_wait=0.0, llm_work=10.0, step=5.0) -> Prediction:
    return Prediction(StageTimes(media_wait, media_work), StageTimes(llm_wait, llm_work), step)


def test_slo_defaults_by_class_and_request_overrides():
    defaults = SloDefaults(video=Slo(8000, 100), image=Slo(3000, 100), text=Slo(1000, 50))
    assert defaults.for_request(["image", "video"]) == ("video", Slo(8000, 100))
    assert defaults.for_request(["image"], ttft_ms=500) == ("image", Slo(500, 100))
    assert defaults.for_request([], tpot_ms=20) == ("text", Slo(1000, 20))


def test_admits_what_fits_and_refuses_with_a_retry_hint_what_does_not():
    slo = Slo(ttft_ms=1000, tpot_ms=100)
    assert decide(prediction(media_work=500), slo, allow_degrade=False).admit
    refused = decide(prediction(media_wait=900, media_work=500), slo, allow_degrade=False)
    assert not refused.admit
    assert refused.reason == "predicted time to first token 1410 ms exceeds the 1000 ms target"
    assert refused.retry_after_ms >= 410  # at least the predicted overrun
    refused = decide(prediction(step=150), slo, allow_degrade=False)
    assert not refused.admit and refused.reason == "predicted time per token 150 ms exceeds the 100 ms target"


def test_a_refusal_says_how_the_calibration_scaled_its_prediction():
    slo = Slo(ttft_ms=1250, tpot_ms=100)
    refused = decide(prediction(media_work=638, llm_work=10), slo, allow_degrade=False, ttft_scale=2.0)
    assert refused.reason == ("predicted time to first token 1296 ms (648 ms × 2.00 calibration) exceeds the "
                              "1250 ms target")
    refused = decide(prediction(step=60), slo, allow_degrade=False, ttft_scale=2.0, tpot_scale=1.9)
    assert refused.reason == "predicted time per token 114 ms (60 ms × 1.90 calibration) exceeds the 100 ms target"


def test_a_refusal_under_headroom_names_the_limit_it_missed():
    # 800 ms is within the 1000 ms target but not within half of it: the message must not say "target" alone.
    slo = Slo(ttft_ms=1000, tpot_ms=100)
    refused = decide(prediction(media_work=790), slo, allow_degrade=False, headroom=0.5)
    assert refused.reason == "predicted time to first token 800 ms exceeds 500 ms (0.50 × the 1000 ms target)"
    refused = decide(prediction(step=60), slo, allow_degrade=False, headroom=0.5)
    assert refused.reason == "predicted time per token 60 ms exceeds 50 ms (0.50 × the 100 ms target)"


def test_degradation_keeps_fewer_frames_when_that_meets_the_target():
    slo = Slo(ttft_ms=1000, tpot_ms=100)
    decision = decide(prediction(media_wait=100, media_work=1780, llm_work=10), slo, allow_degrade=True)
    assert decision.admit and decision.frame_scale == pytest.approx(0.5)
    # Not even the smallest degradation fits: refused like everyone else.
    assert not decide(prediction(media_wait=1500, media_work=1000), slo, allow_degrade=True).admit
    assert degraded_frames(768, 0.5) == 384
    assert degraded_frames(10, 0.1) == 4
    assert degraded_frames(33, 0.5) % 2 == 0


def test_backlog_counts_only_work_due_no_later():
    backlog = Backlog()
    early = backlog.add(deadline=10.0, work_ms=100)
    backlog.add(deadline=20.0, work_ms=300)
    assert backlog.work_ahead_ms(15.0) == 100
    assert backlog.work_ahead_ms(25.0) == 400
    backlog.remove(early)
    assert backlog.total_ms() == 300 and len(backlog) == 1


def test_slack_queue_serves_least_slack_first_then_arrival():
    queue = SlackQueue()
    for latest_start, name in [(5.0, "b"), (1.0, "a"), (5.0, "c"), (9.0, "d")]:
        queue.push(latest_start, name)
    queue.discard("d")
    assert [queue.pop() for _ in range(len(queue))] == ["a", "b", "c"]


def test_retry_hint_rounds_up_to_50_ms():
    slo = Slo(1000, 100)
    assert decide(prediction(media_wait=1001, llm_work=0), slo, allow_degrade=False).retry_after_ms == 50
    assert decide(prediction(media_wait=1120, llm_work=0), slo, allow_degrade=False).retry_after_ms == 150


# Controller ----------------------------------------------------------------------------------------

def make_controller(step_ms: float, probe_after_s: float = 5.0, step_ms_per_seq: float = 0.0) -> Controller:
    """Admission over fake pools whose llm predicts decode steps of step_ms (plus step_ms_per_seq a sequence)."""
    llms = make_pool(1, max_in_flight=0)
    llms.replicas["r0"].costs = LlmCosts(CostSeeds(step_ms=step_ms, step_ms_per_seq=step_ms_per_seq))
    return Controller(make_pool(1), make_pool(1), llms, defaults=SloDefaults(Slo(8000, 100), Slo(3000, 100),
                      Slo(1000, 100)), policy="slo", headroom=1.0, probe_after_s=probe_after_s)


def test_an_idle_stack_that_refuses_everything_admits_one_probe_per_probe_after_s():
    controller = make_controller(step_ms=300.0)  # a pessimistic model: every request misses its TPOT
    admit = lambda now: controller.admit([], [], 20, ttft_ms=0, tpot_ms=0, allow_degrade=False, now=now)  # noqa: E731
    probe = admit(100.0)
    assert probe.decision.admit and probe.decision.reason == "probe"
    assert not admit(100.5).decision.admit  # something is in flight: the probe's own backlog
    controller.release(probe)
    assert not admit(101.0).decision.admit  # idle, but a probe was admitted 1 s ago
    assert admit(105.5).decision.admit  # idle and probe_after_s later: the next probe


def test_no_probe_for_a_request_that_would_miss_by_far():
    controller = make_controller(step_ms=1000.0)  # ten times its 100 ms target
    assert not controller.admit([], [], 20, ttft_ms=0, tpot_ms=0, allow_degrade=False, now=100.0).decision.admit


def test_a_busy_stack_never_probes():
    controller = make_controller(step_ms=300.0)
    controller.pools["llm"].replicas["r0"].num_in_flight = 1  # e.g. a request admitted before the model soured
    assert not any(controller.admit([], [], 20, ttft_ms=0, tpot_ms=0, allow_degrade=False, now=t).decision.admit
                   for t in (100.0, 200.0, 300.0))


def test_calibration_gives_quantiles_of_actual_over_predicted():
    calibration = Calibration(floor_ms=0.0)
    assert calibration.scale(0.5) == 2.0  # nothing seen yet: a cautious start, as if ten outcomes took twice
    for i in range(9):
        calibration.observe(100.0, 300.0)
    assert calibration.scale(0.9) == 3.0  # nine outcomes say more than the start
    for i in range(91):
        calibration.observe(100.0, 100.0 + i)  # ratios 1.00 .. 1.90, plus the nine at 3.0
    assert calibration.scale(0.9) == pytest.approx(1.89)  # 90 of the 100 stayed within it
    assert calibration.scale(0.5) == pytest.approx(1.49)
    for _ in range(200):
        calibration.observe(100.0, 50.0)  # the model turned pessimistic: admission may trust it less
    assert calibration.scale(0.9) == pytest.approx(0.5)


def test_strictness_settles_where_the_target_share_meets_the_slo():
    strictness = Strictness(0.95, start=0.8, rate=0.05)
    for _ in range(200):
        strictness.observe(True)
    assert strictness.value == 0.5  # everything meets: plan for the median error
    for _ in range(20):
        strictness.observe(False)
    assert strictness.value == 0.99  # misses: plan for the worst errors seen
    strictness.value = 0.8
    for i in range(4000):  # exactly 1 - target of them miss: no drift either way
        strictness.observe(i % 20 != 0)
    assert strictness.value == pytest.approx(0.8, abs=0.05)


def busy_controller(**kwargs) -> Controller:
    controller = make_controller(**kwargs)
    controller.pools["llm"].replicas["r0"].num_in_flight = 1  # busy: no probes
    return controller


def test_a_class_whose_requests_run_late_is_admitted_against_calibrated_predictions():
    controller = busy_controller(step_ms=1.0)
    admit = lambda kinds, ttft: controller.admit(kinds, [], 2000, ttft_ms=ttft, tpot_ms=0,  # noqa: E731
                                                 allow_degrade=False, now=100.0)
    ticket = admit([], 1000)  # text, predicted prefill 5 + 0.05 × 2000 = 105 ms against 1000 ms
    assert ticket.decision.admit
    for _ in range(25):
        controller.record(ticket, ttft_ms=2000, met=True)  # its class takes 19 times the prediction
    controller.release(ticket)
    assert not admit([], 1000).decision.admit  # 105 ms × 18.2 ((2000 + 5) / (105 + 5)) no longer fits
    assert admit([], 2000).decision.admit
    controller.pools["decoder"].replicas["r0"].costs = DecodeCost(CostSeeds())
    image = MediaShape(num_frames=1, num_pixels=50_000, num_patches=64)
    assert controller.admit(["image"], [image], 2000, ttft_ms=1000, tpot_ms=0, allow_degrade=False,
                            now=100.0).decision.admit  # other classes keep their own calibration
    # ... but an image found in the cache waits on the llm alone, as a text does: it errs as one
    assert not admit(["image"], 1000).decision.admit


def test_cached_media_are_calibrated_apart_from_the_media_their_class_encodes():
    controller = busy_controller(step_ms=1.0)
    controller.pools["decoder"].replicas["r0"].costs = DecodeCost(CostSeeds())
    image = MediaShape(num_frames=1, num_pixels=50_000, num_patches=64)
    admit = lambda shapes, ttft: controller.admit(["image"], shapes, 2000, ttft_ms=ttft,  # noqa: E731
                                                  allow_degrade=False, tpot_ms=0, now=100.0)
    encoded, cached = admit([image], 3000), admit([], 3000)
    predicted = encoded.prediction.ttft_ms
    for _ in range(25):  # the encodes take three times their prediction, the cache hits a third of theirs
        controller.record(encoded, ttft_ms=3 * predicted, met=True)
        controller.record(cached, ttft_ms=cached.prediction.ttft_ms / 3, met=True)
    assert controller.ttft_calibration["image"].scale(0.5) == pytest.approx(3.0, rel=0.05)
    assert controller.ttft_calibration["text"].scale(0.5) == pytest.approx(0.36, rel=0.05)
    controller.release(encoded)
    controller.release(cached)
    assert not admit([image], 1.5 * predicted).decision.admit  # 3 × the prediction: twice the target
    assert admit([], 1000).decision.admit


def test_a_noisy_step_model_tightens_the_time_per_token_gate():
    controller = busy_controller(step_ms=60.0)  # against a 100 ms target
    admit = lambda: controller.admit([], [], 20, ttft_ms=0, tpot_ms=0, allow_degrade=False, now=100.0)  # noqa: E731
    assert not admit().decision.admit  # a new router counts its predictions twice until it has seen outcomes
    for _ in range(20):
        controller.record_step(60.0, 60.0)  # the step model is right
    assert admit().decision.admit
    for _ in range(200):
        controller.record_step(60.0, 120.0)  # steps take twice what the model said for their batch
    decision = admit().decision
    assert not decision.admit and "time per token" in decision.reason and "calibration)" in decision.reason


def test_time_per_token_is_priced_at_the_batch_the_admitted_requests_will_make():
    controller = busy_controller(step_ms=10.0, step_ms_per_seq=2.0)
    for _ in range(20):
        controller.record_step(50.0, 50.0)  # a step model proven right
    admit = lambda: controller.admit([], [], 20, ttft_ms=10_000, tpot_ms=50, allow_degrade=False,  # noqa: E731
                                     now=100.0)
    # The k-th is priced at 10 + 2 × (1 running + k admitted on their way, none at the llm yet + itself).
    assert all(admit().decision.admit for _ in range(19))  # k = 0 .. 18: up to 50 ms
    refused = admit().decision  # k = 19: 52 ms
    assert not refused.admit and "time per token" in refused.reason


def test_a_narrow_miss_by_its_own_work_is_admitted_but_not_one_behind_a_queue():
    controller = busy_controller(step_ms=1.0)
    for _ in range(20):
        controller.tpot_calibration.observe(1.0, 1.0)
    admit = lambda prompt, now=100.0: controller.admit([], [], prompt, ttft_ms=1000, tpot_ms=0,  # noqa: E731
                                                       allow_degrade=False, now=now)
    # Predicted prefill 5 + 0.05 × 12,000 = 605 ms, × 2 (a new router's calibration) = 1,210 ms against 1,000:
    # nothing queued ahead, so refusing it would give the others nothing.
    first = admit(12_000)
    assert first.decision.admit and first.decision.reason == "own work"
    # The same prompt behind it waits for its 605 ms: refused, its work would lengthen the queue.
    queued = admit(12_000).decision
    assert not queued.admit and "time to first token" in queued.reason
    controller.release(first)
    # Alone again, but twice the target (5 + 0.05 × 20,000 = 1,005 ms, × 2): a miss for sure, refused.
    assert not admit(20_000).decision.admit


def test_outcomes_displace_the_cautious_start_one_by_one():
    calibration = Calibration(floor_ms=0.0)  # a start of ten outcomes at 2.0; min_tail 4
    for _ in range(6):
        calibration.observe(100.0, 100.0)  # predictions proven right, but only six of them
    assert calibration.scale(0.5) == 1.0  # the typical error is known already
    assert calibration.scale(0.95) == 2.0  # the tail is still the start's four
    calibration.observe(100.0, 100.0)
    assert calibration.scale(0.95) == 1.0  # three left of the start: fewer than min_tail


def test_a_few_noisy_outcomes_do_not_multiply_predictions():
    calibration = Calibration(floor_ms=0.0)
    for i in range(20):
        calibration.observe(100.0, 1100.0 if i % 7 == 0 else 100.0)  # three outcomes eleven times slower
    assert calibration.scale(0.95) == 1.0  # the 0.95-quantile of 20 is the largest: one stall would decide it
    assert calibration.scale(0.99) == 1.0


def test_a_sustained_under_prediction_is_still_corrected():
    calibration = Calibration(floor_ms=0.0)
    for i in range(20):
        calibration.observe(100.0, 1000.0 + i)  # every outcome ten times what was predicted
    assert 10.0 < calibration.scale(0.95) <= 10.19  # corrected in full (the fourth largest ratio)


def test_a_new_router_refuses_only_what_misses_at_the_typical_error_and_tightens_on_misses():
    controller = busy_controller(step_ms=60.0)  # against a 100 ms target
    for i in range(200):
        controller.record_step(60.0, 108.0 if i % 10 == 0 else 60.0)  # a tenth of the steps run 1.8× slower
    admit = lambda: controller.admit([], [], 20, ttft_ms=0, tpot_ms=0, allow_degrade=False, now=100.0)  # noqa: E731
    ticket = admit()
    assert ticket.decision.admit  # it would meet unless it is among the slowest tenth: refusing it is a sure miss
    for _ in range(10):
        controller.record(ticket, ttft_ms=2000.0, met=False)  # admitted requests miss: an overload
    assert not admit().decision.admit  # now planned at the slowest tenth: 60 ms × 1.74


def test_a_streamed_request_is_priced_as_a_pipeline_not_the_sum_of_its_stages():
    from services.router.policy import pipelined_ms

    assert pipelined_ms((4000.0, 2000.0, 1000.0), 10) == 4000 + 300  # the slowest, plus one chunk of the others
    assert pipelined_ms((4000.0, 2000.0, 1000.0), 1) == 7000  # one chunk: nothing overlaps
    streamed = Prediction(StageTimes(100, 6000), StageTimes(50, 1000), 5, num_chunks=10, decode_ms=4000)
    assert streamed.ttft_ms == 100 + 50 + 4300
    assert Prediction(StageTimes(100, 6000), StageTimes(50, 1000), 5, decode_ms=4000).ttft_ms == 7150
    # A long video whose stages add up past its target, but whose pipeline meets it, is admitted.
    slo = Slo(ttft_ms=5000, tpot_ms=100)
    assert decide(streamed, slo, allow_degrade=False).admit
    assert not decide(dataclasses.replace(streamed, num_chunks=0), slo, allow_degrade=False).admit


def test_the_controller_prices_streamed_requests_by_their_chunks():
    controller = make_controller(step_ms=10.0)
    controller.pools["decoder"].replicas["r0"].costs = DecodeCost(CostSeeds())
    shape = MediaShape(num_frames=64, num_pixels=64 * 100_000, num_patches=4096)
    summed = controller.predict([shape], 200, deadline=time.perf_counter() + 10)
    streamed = controller.predict([shape], 200, deadline=time.perf_counter() + 10, num_chunks=8)
    stages = (streamed.decode_ms, streamed.media.work_ms - streamed.decode_ms, streamed.llm.work_ms)
    assert min(stages) > 0 and summed.media.wait_ms == summed.llm.wait_ms == 0
    assert summed.ttft_ms == pytest.approx(sum(stages))
    assert streamed.ttft_ms == pytest.approx(max(stages) + (sum(stages) - max(stages)) / 8)
