"""The decoder service as a real process: streamed chunks equal decode_video, and bad media never hurts it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import struct
import subprocess
import sys
import zlib

import grpc
import numpy as np
import psutil
import pytest
import torch

from mmserve import rpc, transport
from stack.ports import free_port
from mmserve.media.image import decode_image
from mmserve.media.samples import make_image, make_video
from mmserve.media.video import decode_video
from mmserve.v1 import decoder_pb2, decoder_pb2_grpc
from services.decoder.config import DecoderConfig
from services.decoder.engine import FAULT_INJECTION_ENV

SMALL = 28 * 28 * 4
BFRAMES = {"x264-params": "bframes=3:b-adapt=0:b-pyramid=normal"}


@contextlib.contextmanager
def decoder_process(env: dict[str, str] | None = None, **settings):
    """A decoder process with settings (DecoderConfig fields) once it serves; yields (stub, process, config)."""
    config = DecoderConfig(port=free_port(), log_level="ERROR", **settings)
    process = subprocess.Popen([sys.executable, "-m", "services.decoder", *config.to_argv()], env=env)
    address = f"127.0.0.1:{config.port}"
    try:
        asyncio.run(rpc.wait_healthy(address, 60))
        channel = grpc.insecure_channel(address, options=rpc.message_options(256 * 1024 * 1024))
        yield decoder_pb2_grpc.DecoderStub(channel), process, config
        channel.close()
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """A decoder process with two workers, short limits and fault injection on; yields (stub, process)."""
    media_root = tmp_path_factory.mktemp("decoder-media")
    with decoder_process({**os.environ, FAULT_INJECTION_ENV: "1"}, media_root=str(media_root), num_workers=2,
                         task_timeout_s=3.0, task_ms_per_packet=0.0, max_video_seconds=20.0,
                         min_chunk_cost=10.0) as (stub, process, _):
        yield stub, process, media_root


def video_request(data: bytes, fps: float = 2.0, request_id: str = "t", **kwargs) -> decoder_pb2.DecodeRequest:
    return decoder_pb2.DecodeRequest(request_id=request_id, kind=decoder_pb2.MEDIA_KIND_VIDEO, data=data, fps=fps,
                                     min_frames=4, max_frames=768, min_pixels=SMALL, max_pixels=768 * 28 * 28,
                                     total_pixels=int(128000 * 28 * 28 * 0.9), **kwargs)


def image_request(data: bytes, request_id: str = "t") -> decoder_pb2.DecodeRequest:
    return decoder_pb2.DecodeRequest(request_id=request_id, kind=decoder_pb2.MEDIA_KIND_IMAGE, data=data,
                                     min_pixels=SMALL, max_pixels=16384 * 28 * 28)


def decode(stub, request) -> list[decoder_pb2.DecodeChunk]:
    return list(stub.Decode(request, timeout=60))


def error_of(stub, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        decode(stub, request)
    return info.value


@pytest.fixture(scope="module")
def clip():
    return make_video(seconds=3.0, fps=30, width=112, height=84, gop=15, encoder_options=BFRAMES)


def test_video_streams_even_chunks_equal_to_decode_video(decoder, clip):
    stub, _, _ = decoder
    chunks = decode(stub, video_request(clip, fps=4.0))
    reference = decode_video(clip, fps=4.0, min_pixels=SMALL)
    assert len(chunks) == 2
    assert [c.chunk_index for c in chunks] == [0, 1] and {c.num_chunks for c in chunks} == {2}
    assert all(len(c.frame_indices) % 2 == 0 for c in chunks)
    assert [i for c in chunks for i in c.frame_indices] == reference.indices
    frames = torch.cat([transport.from_ref(c.frames) for c in chunks])
    assert torch.equal(frames, torch.from_numpy(reference.frames))
    assert chunks[0].sample_fps == pytest.approx(reference.sample_fps)
    assert all(c.decode_ms > 0 for c in chunks)


def by_uri_request(path, **fields) -> decoder_pb2.DecodeRequest:
    return decoder_pb2.DecodeRequest(
        kind=decoder_pb2.MEDIA_KIND_VIDEO, uri=path.as_uri(), fps=2.0, min_frames=4, max_frames=768,
        min_pixels=SMALL, max_pixels=768 * 28 * 28, total_pixels=int(128000 * 28 * 28 * 0.9), **fields)


def test_file_uri_and_image(decoder, clip):
    stub, _, media_root = decoder
    (media_root / "clip.mp4").write_bytes(clip)
    by_uri = decode(stub, by_uri_request(media_root / "clip.mp4"))
    assert torch.equal(torch.cat([transport.from_ref(c.frames) for c in by_uri]),
                       torch.from_numpy(decode_video(clip, min_pixels=SMALL).frames))
    # A file that changed since the router hashed it (another size) is refused: its cache keys would be wrong.
    stale = by_uri_request(media_root / "clip.mp4", file_size=len(clip) + 1)
    err = error_of(stub, stale)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "changed after the router read it" in err.details()
    path = media_root / "clip.mp4"
    assert len(decode(stub, by_uri_request(path, file_size=len(clip), file_mtime_ns=path.stat().st_mtime_ns))) >= 1
    picture = make_image(width=100, height=60, fmt="PNG", seed=3)
    (chunk,) = decode(stub, image_request(picture))
    assert list(chunk.frame_indices) == [0]
    assert torch.equal(transport.from_ref(chunk.frames),
                       torch.from_numpy(decode_image(picture, min_pixels=SMALL, max_pixels=16384 * 28 * 28)))


def _maps_torch(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "libtorch" in f.read()


def test_no_decoder_process_loads_torch(decoder, clip):
    """The gRPC front end hands frames on as numpy arrays and the workers resize them with Pillow: neither they nor
    their fork server load torch, having served a video and an image (it cost about 200 MB of idle memory in each
    and a second of start-up)."""
    stub, process, _ = decoder
    assert len(decode(stub, video_request(clip))) >= 1
    assert len(decode(stub, image_request(make_image(width=100, height=60, fmt="PNG", seed=4)))) == 1
    assert _maps_torch(os.getpid())  # what the check looks for is there to find: this test process has torch
    servers = [p.pid for p in psutil.Process(process.pid).children()]
    assert len(workers := _workers(process)) == 2
    for pid in [process.pid, *servers, *workers]:
        assert not _maps_torch(pid), psutil.Process(pid).cmdline()


def _thread_niceness(pid: int) -> set[int]:
    """The niceness of each thread of a process (field 19 of /proc/<pid>/task/<tid>/stat); a thread that ended
    between the listing and the read has none."""
    values = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                values.add(int(f.read().rsplit(")", 1)[1].split()[16]))
        except FileNotFoundError:
            continue
    return values


def test_every_decoder_thread_gives_way_to_the_llm(decoder, clip):
    """Niceness 10 by default (DecoderConfig.nice), in every thread of the front end, its fork server and workers."""
    stub, process, _ = decoder
    assert len(decode(stub, video_request(clip))) >= 1
    base = os.nice(0)  # the test runner's own
    assert _thread_niceness(os.getpid()) == {base}
    for pid in [process.pid, *(p.pid for p in psutil.Process(process.pid).children()), *_workers(process)]:
        assert _thread_niceness(pid) == {min(19, base + 10)}, psutil.Process(pid).cmdline()


def test_concurrent_requests_all_match(decoder):
    stub, _, _ = decoder
    clips = [make_video(seconds=1.0, fps=30, width=84, height=56, seed=s, gop=10) for s in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: decode(stub, video_request(c, fps=6.0)), clips))
    for data, chunks in zip(clips, results):
        frames = torch.cat([transport.from_ref(c.frames) for c in chunks])
        assert torch.equal(frames, torch.from_numpy(decode_video(data, fps=6.0, min_pixels=SMALL).frames))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds a few bytes of pixels (a decompression bomb)."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _bad_media():
    clip = make_video(seconds=2.0, fps=30, width=112, height=84)
    faststart = make_video(seconds=2.0, fps=30, width=112, height=84, faststart=True)
    return {
        "zero-length video": (video_request(b""), "video: empty data"),
        "zero-length image": (image_request(b""), "image: empty data"),
        "random bytes": (video_request(np.random.default_rng(0).bytes(20000)), "not a recognised video"),
        "wrong magic: png as video": (video_request(make_image()), "still image"),
        "wrong magic: mp4 as image": (image_request(clip), "not a JPEG, PNG, WebP or GIF"),
        "truncated mp4 (index lost)": (video_request(clip[: len(clip) // 2]), "video:"),
        "truncated mp4 (data lost)": (video_request(faststart[: len(faststart) // 2]), "truncated"),
        "unsupported codec": (video_request(make_video(codec="ffv1", container="mkv", seconds=0.2, width=64,
                                                       height=48)), "unsupported codec 'ffv1'"),
        "absurd dimensions": (video_request(make_video(seconds=0.1, width=8200, height=16, gop=1)),
                              "8200x16 exceeds the limit"),
        "too long": (video_request(make_video(seconds=25.0, fps=2, width=32, height=32)), "over the limit of 20 s"),
        "decompression bomb": (image_request(_png_header_only(100000, 100000)), "too large"),
        "image over the pixel limit": (image_request(_png_header_only(9000, 9000)), "over the limit"),
    }


BAD = _bad_media()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_media_is_invalid_argument(decoder, case):
    stub, process, _ = decoder
    request, message = BAD[case]
    err = error_of(stub, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert message in err.details()
    assert process.poll() is None


@pytest.mark.parametrize(("fault", "message"), [("crash", "crashed on this media (signal SIGSEGV)"),
                                                ("hang", "longer than the 3 s limit")])
def test_broken_worker_fails_only_its_request(decoder, clip, fault, message):
    stub, process, _ = decoder
    before = set(_workers(process))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        healthy = pool.submit(decode, stub, video_request(clip, request_id="healthy"))
        err = error_of(stub, video_request(clip, request_id=f"fault:{fault}"))
        assert len(healthy.result()) >= 1
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()
    # The broken worker was replaced; the service carries on.
    assert len(_workers(process)) == 2 and set(_workers(process)) != before
    assert len(decode(stub, video_request(clip))) >= 1


def test_killed_idle_worker_is_replaced(decoder, clip):
    stub, process, _ = decoder
    for pid in _workers(process):
        psutil.Process(pid).kill()
    for _ in range(3):
        assert len(decode(stub, video_request(clip))) >= 1
    assert len(_workers(process)) == 2


def _workers(process: subprocess.Popen) -> list[int]:
    """Live worker pids: the children of the decoder's fork server."""
    pids = []
    for server in psutil.Process(process.pid).children():
        if "multiprocessing.forkserver" in " ".join(server.cmdline()):
            pids += [w.pid for w in server.children() if w.status() != psutil.STATUS_ZOMBIE]
    return pids


def test_a_request_cancelled_at_any_point_gives_its_place_in_the_queue_back(tmp_path):
    """A cancellation anywhere in a decode leaves the queue as it found it: a count that leaked (a cancellation
    between counting a request and its try) filled the queue for good, and every later request was refused as over
    capacity."""
    from services.decoder.config import DecoderConfig
    from services.decoder.engine import DecodeEngine

    picture = make_image(width=100, height=60, fmt="PNG", seed=5)

    async def run() -> list[int]:
        engine = DecodeEngine(DecoderConfig(num_workers=1, scratch_dir=str(tmp_path), max_queue=4))
        await engine.start()
        leaked = []
        try:
            for k in range(30):  # cancelled after k turns of the event loop: at each await of the decode in turn
                task = asyncio.ensure_future(engine.decode_image(picture, min_pixels=SMALL,
                                                                 max_pixels=16384 * 28 * 28))
                for _ in range(k):
                    await asyncio.sleep(0)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                leaked.append(engine.num_active)
            assert (await engine.decode_image(picture, min_pixels=SMALL, max_pixels=16384 * 28 * 28)).frames.shape[0]
        finally:
            await engine.close()
        return leaked

    assert asyncio.run(run()) == [0] * 30
    assert list(tmp_path.iterdir()) == []  # no request's scratch directory left behind
