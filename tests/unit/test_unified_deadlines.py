"""The encode's due time the router sends a unified replica is on the llm's priority clock (wall seconds)."""

from __future__ import annotations

import math
import time

import pytest

from services.unified.deadlines import DUE_HEADER, due_from, due_metadata


def test_the_latest_media_start_arrives_as_a_wall_clock_due_time():
    metadata = due_metadata(time.perf_counter() + 2.0)  # must start within 2 s
    due = due_from(metadata)
    assert due == pytest.approx(time.time() + 2.0, abs=0.1)  # comparable to the llm's priorities (time.time())


def test_without_a_due_time_an_encode_has_none():
    assert due_metadata(math.inf) == ()
    assert due_from((("other", "1"),)) is None
    assert due_from(((DUE_HEADER, "soon"),)) is None
    assert due_from(((DUE_HEADER, "inf"),)) is None
    assert due_from(None) is None
