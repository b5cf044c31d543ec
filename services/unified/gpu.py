"""A unified replica on an NVIDIA GPU: the llm's steps on a high-priority CUDA stream, the encoder's on a low one.

Selected by capability (stack.unified): both roles on the same CUDA device. Each role's thread makes its stream
current once (torch's current stream is per thread), so the tower's kernels queue behind the decode steps' at
the hardware scheduler, and the arbiter bounds each slice to about one decode step's target (one per step).
Untested here (no GPU on the development machine): tests/gpu/test_unified_gpu.py.
"""

from __future__ import annotations

import torch


class RoleStreams:
    """One CUDA stream per role on one device: the llm's at the highest priority, the encoder's at the lowest."""

    def __init__(self, device: torch.device):
        lowest, highest = torch.cuda.Stream.priority_range()  # CUDA: a lower number is a higher priority
        self.llm = torch.cuda.Stream(device, priority=highest)
        self.encoder = torch.cuda.Stream(device, priority=lowest)

    def use_llm(self) -> None:
        """Called once in the llm's engine thread: its steps queue on the high-priority stream."""
        torch.cuda.set_stream(self.llm)


def role_streams(encoder_device: torch.device, llm_device: torch.device) -> RoleStreams | None:
    """Streams for both roles where they share one CUDA device, else None (the CPU paths: turns or overlap)."""
    devices = {(d.type, d.index or 0) for d in (encoder_device, llm_device)}  # "cuda" is "cuda:0" here
    if devices != {("cuda", llm_device.index or 0)} or not torch.cuda.is_available():
        return None
    return RoleStreams(llm_device)
