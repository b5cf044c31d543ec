"""The batch admission prices a request's tokens at: each admitted request counted once, wherever it is."""

from __future__ import annotations

import pytest

from services.router.admission import Controller
from tests.unit.test_admission_cancel import make_stack, shape


def predicted_batch(controller: Controller) -> float:
    """The batch size behind the step prediction of the next request (step cost is linear in it)."""
    costs = controller.pools["llm"].replicas["r0"].costs.step
    step_ms = controller.predict([shape(3)], 80.0, 104.0).step_ms
    return (step_ms - costs.predict(0)) / (costs.predict(1) - costs.predict(0))


async def test_a_request_at_the_llm_before_its_first_token_counts_once_in_the_next_ones_batch():
    controller = make_stack()
    assert predicted_batch(controller) == pytest.approx(1.0)  # itself
    ticket = controller.admit(["text"], [], 50.0, ttft_ms=0, tpot_ms=0, allow_degrade=False, now=100.0)
    assert ticket.decision.admit
    assert predicted_batch(controller) == pytest.approx(2.0)  # on its way: in the llm backlog
    llms = controller.pools["llm"]
    async with llms.slot(latest_start=ticket.deadline, work_ms=lambda r: 1.0):
        controller.at_llm(ticket, True)  # queued or prefilling at the llm: in its num_in_flight now
        assert predicted_batch(controller) == pytest.approx(2.0)
        controller.at_llm(ticket, True)  # said twice (a retry on another replica) still counts once
        assert predicted_batch(controller) == pytest.approx(2.0)
        controller.finish(ticket, "llm")  # first token: decoding, in num_in_flight only
        assert predicted_batch(controller) == pytest.approx(2.0)
    controller.release(ticket)
    assert predicted_batch(controller) == pytest.approx(1.0)
