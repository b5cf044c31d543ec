"""A unified replica's CUDA streams: the llm's outranks the encoder's, and the tower's output is the same on its
stream as on the default one (skipped without a GPU; never run on the development machine)."""

from __future__ import annotations

import threading

import pytest
import torch

from services.unified.gpu import role_streams

pytestmark = pytest.mark.gpu


def test_roles_on_one_gpu_get_streams_the_llm_first():
    streams = role_streams(torch.device("cuda"), torch.device("cuda:0"))
    assert streams is not None
    assert streams.llm.priority < streams.encoder.priority  # CUDA: lower is served first
    assert role_streams(torch.device("cpu"), torch.device("cuda:0")) is None


def test_the_llm_thread_keeps_its_stream_and_others_keep_theirs():
    streams = role_streams(torch.device("cuda:0"), torch.device("cuda:0"))
    seen = []
    thread = threading.Thread(target=lambda: (streams.use_llm(), seen.append(torch.cuda.current_stream())))
    thread.start()
    thread.join()
    assert seen == [streams.llm] and torch.cuda.current_stream() != streams.llm  # per thread


def test_work_on_the_encoder_stream_equals_the_default_stream():
    streams = role_streams(torch.device("cuda:0"), torch.device("cuda:0"))
    x = torch.randn(256, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.cuda.stream(streams.encoder):
        on_encoder = (x @ x).cpu()
    assert torch.equal(on_encoder, (x @ x).cpu())
