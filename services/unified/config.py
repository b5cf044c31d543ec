"""Settings of a unified replica's device arbiter (the encoder and the llm keep their own configs)."""

from __future__ import annotations

import dataclasses

from mmserve.config import option


@dataclasses.dataclass(frozen=True)
class ArbiterConfig:
    """How the encoder's slices share the device with the llm's decode steps."""

    max_decode_slowdown: float = option(1.2, "the running decodes' time per token may be at most this times their "
                                             "step alone while the encoder has work (0: no such bound)")
    tpot_target_ms: float = option(0.0, "time per output token the running decodes must keep (0: none; with "
                                         "max_decode_slowdown, the tighter of the two)")
    overlap_threads: int = option(0, "CPU: while decodes run, an encoder slice runs alongside the llm's steps on "
                                     "this many torch threads and the steps on the rest of the llm's "
                                     "--num-threads (a core split only while both have work; 0: they take turns)")
    max_saved_steps: int = option(8, "the encoder may save up the slack of this many decode steps for one slice "
                                     "(a longer stall of one token, the same mean)")
    max_idle_slice_ms: float = option(50.0, "with no decode running, a slice holds the device about this long at "
                                            "most, so a prefill that arrives meanwhile waits no longer (the first "
                                            "item always runs whole; 0: no bound)")

    def __post_init__(self) -> None:
        if self.max_decode_slowdown and self.max_decode_slowdown <= 1.0:
            raise ValueError("max_decode_slowdown: must exceed 1 (0: no bound)")
        if self.tpot_target_ms < 0:
            raise ValueError("tpot_target_ms: must not be negative")
        if not self.max_decode_slowdown and not self.tpot_target_ms:
            raise ValueError("max_decode_slowdown: 0 needs a tpot_target_ms (something must bound the decodes)")
        if self.overlap_threads < 0:
            raise ValueError("overlap_threads: must not be negative")
        if self.max_idle_slice_ms < 0:
            raise ValueError("max_idle_slice_ms: must not be negative")
        if self.max_saved_steps < 1:
            raise ValueError("max_saved_steps: must be at least 1")
