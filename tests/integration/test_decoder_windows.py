"""Issue 23 in a real decoder process: fixed chunk windows whatever the workers, chunk subsets, and decode-ahead
bounded by the chunks its consumer has taken, which keeps its memory flat as the clip grows."""

from __future__ import annotations

import contextlib
import glob
import os
import subprocess

import grpc
import psutil
import pytest
import torch

from mmserve import transport
from mmserve.media.samples import make_video
from mmserve.media.video import decode_video
from mmserve.transport import shm
from stack.ports import free_port
from tests.integration.helpers import metric, peak_rss_mib
from tests.integration.test_decoder import BFRAMES, SMALL, decoder_process, video_request

DECODED = "mmserve_decoder_chunks_decoded_total"
HELD_BACK = "mmserve_decoder_requests_held_back"


@contextlib.contextmanager
def windowed_decoder(scratch: str, **settings):
    """A decoder process with metrics, every chunk in shared memory however small (its segment is what the consumer
    takes); yields (stub, process, config)."""
    with decoder_process(metrics_port=free_port(), scratch_dir=scratch, min_chunk_cost=10.0, inline_limit_bytes=1024,
                         **settings) as running:
        yield running


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """Decoders with one and with three workers."""
    with (windowed_decoder(str(tmp_path_factory.mktemp("one")), num_workers=1) as one,
          windowed_decoder(str(tmp_path_factory.mktemp("three")), num_workers=3) as three):
        yield one, three


@pytest.fixture(scope="module")
def clip():
    # 18 sampled frames at 6 fps from GOPs of 15: windows of 4 start mid-GOP (source frames 20, 40, ...).
    return make_video(seconds=3.0, fps=30, width=112, height=84, gop=15, encoder_options=BFRAMES)


def decode(stub, request, *, shared_memory: bool = False) -> list:
    """The chunks, each frames tensor resolved as it arrives (shared memory: mapped and unlinked, as an encoder
    takes it)."""
    metadata = transport.caller_metadata() if shared_memory else None
    return [(c, transport.from_ref(c.frames)) for c in stub.Decode(request, timeout=120, metadata=metadata)]


def described(chunks) -> list:
    return [(c.chunk_index, c.num_chunks, list(c.frame_indices)) for c, _ in chunks]


def test_windows_are_the_same_whatever_the_workers_and_join_into_the_whole_decode(decoders, clip):
    (one, _, _), (three, _, _) = decoders
    by_one = decode(one, video_request(clip, fps=6.0, chunk_frames=4))
    by_three = decode(three, video_request(clip, fps=6.0, chunk_frames=4), shared_memory=True)
    whole = decode(three, video_request(clip, fps=6.0))  # today's path: cut by the workers
    reference = decode_video(clip, fps=6.0, min_pixels=SMALL)
    assert len(reference.indices) == 18
    assert described(by_one) == described(by_three) == [
        (k, 5, reference.indices[4 * k:4 * k + 4]) for k in range(5)]
    for (_, a), (_, b) in zip(by_one, by_three):
        assert torch.equal(a, b)
    joined = torch.cat([frames for _, frames in by_three])
    assert torch.equal(joined, torch.cat([frames for _, frames in whole]))
    assert torch.equal(joined, torch.from_numpy(reference.frames))


def test_chunk_indices_decode_only_those(decoders, clip):
    _, (stub, _, config) = decoders
    everything = decode(stub, video_request(clip, fps=6.0, chunk_frames=4))
    before = metric(config.metrics_port, DECODED)
    some = decode(stub, video_request(clip, fps=6.0, chunk_frames=4, chunk_indices=[3, 1]), shared_memory=True)
    assert metric(config.metrics_port, DECODED) - before == 2
    assert described(some) == [described(everything)[1], described(everything)[3]]
    assert torch.equal(some[0][1], everything[1][1]) and torch.equal(some[1][1], everything[3][1])


@pytest.mark.parametrize(("field", "message"), [
    ({"chunk_frames": 3}, "chunk_frames: 3 is not a positive multiple of the model's temporal group (2 frames)"),
    ({"chunk_frames": 4, "chunk_indices": [5]}, "chunk_indices: 5 is out of range for a plan of 5 chunks")])
def test_a_bad_window_or_subset_is_invalid_argument(decoders, clip, field, message):
    _, (stub, _, _) = decoders
    with pytest.raises(grpc.RpcError) as info:
        decode(stub, video_request(clip, fps=6.0, **field))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_the_decoder_decodes_no_further_ahead_than_its_consumer_has_taken(decoders, clip):
    _, (stub, process, config) = decoders
    port, segments = config.metrics_port, shm.owner_prefix(process.pid)
    scratch = os.path.join(config.scratch_dir, "mmserve-decode-*", "frames-*")
    before = metric(port, DECODED)
    stream = stub.Decode(video_request(clip, fps=6.0, chunk_frames=4, max_chunks_ahead=1), timeout=120,
                         metadata=transport.caller_metadata())
    for n in range(5):
        chunk = next(stream)  # and not taken yet: its segment is still there
        assert chunk.chunk_index == n and chunk.frames.WhichOneof("location") == "shared_memory"
        if n < 4:
            # The next chunk would be the second ahead: the request waits for its consumer, having decoded only
            # this one, whose frames now sit in one segment (its scratch file is gone).
            assert metric(port, HELD_BACK) == 1
        assert metric(port, DECODED) - before == n + 1
        assert shm.list_segments(segments) == [chunk.frames.shared_memory.name]
        assert not glob.glob(scratch)
        transport.from_ref(chunk.frames)  # taken: mapped and unlinked, as an encoder does
    assert list(stream) == []
    assert metric(port, HELD_BACK) == 0 and shm.list_segments(segments) == []


def _peak_rss_mib(process: subprocess.Popen) -> dict[str, float]:
    """VmHWM of the decoder's processes: the server, its fork server and workers, by pid."""
    return {p.pid: round(peak_rss_mib(p.pid), 1)
            for p in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]}


def test_peak_rss_stays_flat_as_the_clip_doubles(tmp_path):
    """Frames are held by the chunk, never by the clip. The clip goes as a file:// URI, as the router sends file
    media: bytes sent inline are the request message's own, and cost the front end a multiple of their size."""
    # 588x336 is a multiple of 28 inside the pixel bounds: frames need no resize, so decoding stays quick.
    seconds = (2.0, 16.0, 32.0)  # a warm-up, then the clip and the clip doubled
    media_root = tmp_path / "media"
    media_root.mkdir()
    with windowed_decoder(str(tmp_path), num_workers=2, max_chunks_ahead=2,
                          media_root=str(media_root)) as (stub, process, _):
        peaks = []
        for s in seconds:
            path = media_root / f"{s:g}s.mp4"
            path.write_bytes(make_video(seconds=s, fps=10, width=588, height=336, gop=30))
            request = video_request(b"", fps=10.0, chunk_frames=16)
            request.uri = path.as_uri()
            chunks = decode(stub, request, shared_memory=True)
            assert sum(len(c.frame_indices) for c, _ in chunks) == 10 * s
            del chunks
            peaks.append(_peak_rss_mib(process))
    _, short, long = peaks
    print(f"decoder {process.pid}: peak RSS MiB by pid after 160 and after 320 frames of 0.6 MB: {short} {long}")
    assert short.keys() == long.keys()
    for name in short:
        assert long[name] <= 1.15 * short[name], name
