"""When an encode is due, as the router tells a unified replica: on the wall clock of the llm's priorities.

The llm orders prefills by the router's TTFT deadline (wall-clock seconds). An encode's own gRPC deadline is the
whole request's, far later, so the router also sends the latest time the media work may start to meet the TTFT
deadline; the arbiter orders the encoder's slices against prefill chunks by it (plain Python, no grpc).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

DUE_HEADER = "mmserve-encode-due"


def due_metadata(latest_start: float) -> tuple[tuple[str, str], ...]:
    """The header for an encode whose media must start by latest_start (perf_counter seconds); none if unbounded."""
    if not math.isfinite(latest_start):
        return ()
    return ((DUE_HEADER, f"{time.time() + latest_start - time.perf_counter():.3f}"),)


def due_from(metadata: Iterable[tuple[str, str]]) -> float | None:
    """The encode's due time from its call's metadata; None without the header (or with a bad one): due when it
    came, first come, first served, as the llm orders requests that carry no deadline of their own."""
    for key, value in metadata or ():
        if key == DUE_HEADER:
            try:
                due = float(value)
            except ValueError:
                return None
            return due if math.isfinite(due) else None
    return None
