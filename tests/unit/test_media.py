"""Image/video decoding: frame sampling, parity with a plain PyAV decode, and clear errors on bad input."""

import io
import struct
import zlib

import av
import numpy as np
import pytest
import torch

from mmserve.media import MediaError
from mmserve.media.image import decode_image
from mmserve.media.preprocess import resize_frames, smart_resize, video_max_pixels
from mmserve.media.samples import make_image, make_video
from mmserve.media.video import decode_video, probe_video

SMALL = 28 * 28 * 4  # min_pixels low enough that 336x224 is kept as is


@pytest.fixture(scope="module")
def clip():
    return make_video(seconds=2.0, fps=30, width=336, height=224)


@pytest.fixture(scope="module")
def all_frames(clip):
    with av.open(io.BytesIO(clip)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_probe_video_fields(clip):
    info = probe_video(clip)
    assert (info.total_frames, info.fps, info.width, info.height) == (60, 30.0, 336, 224)
    assert info.duration_s == pytest.approx(2.0)
    assert info.codec == "h264"
    assert "mp4" in info.container.split(",")


def test_probe_counts_packets_when_container_has_no_frame_count():
    info = probe_video(make_video(seconds=1.0, fps=24, width=128, height=96, codec="vp9", container="webm"))
    assert (info.total_frames, info.fps, info.codec) == (24, 24.0, "vp9")
    assert "webm" in info.container.split(",")


def test_decode_video_samples_exact_frames(clip, all_frames):
    assert len(all_frames) == 60
    out = decode_video(clip, fps=2.0, min_pixels=SMALL)
    assert out.indices == [0, 20, 39, 59] == torch.linspace(0, 59, 4).round().long().tolist()
    assert out.sample_fps == pytest.approx(2.0)
    assert out.frames.shape == (4, 224, 336, 3) and out.frames.dtype == np.uint8
    expected = torch.from_numpy(np.stack([all_frames[i] for i in out.indices]))
    assert torch.equal(torch.from_numpy(out.frames), expected)
    assert out.info == probe_video(clip)


def test_decode_video_more_frames_and_threads(clip, all_frames):
    out = decode_video(clip, fps=6.0, min_pixels=SMALL, threads=2)
    assert out.indices == torch.linspace(0, 59, 12).round().long().tolist()
    expected = torch.from_numpy(np.stack([all_frames[i] for i in out.indices]))
    assert torch.equal(torch.from_numpy(out.frames), expected)


def test_decode_video_resizes_when_needed(clip, all_frames):
    # Default video min_pixels (128 * 784) is above 336x224 = 75264, so frames are scaled up to 280x392.
    out = decode_video(clip)
    assert out.frames.shape == (4, 280, 392, 3)
    picked = torch.from_numpy(np.stack([all_frames[i] for i in out.indices]))
    assert torch.equal(torch.from_numpy(out.frames), resize_frames(picked, 280, 392))
    # A small per-frame budget scales down.
    out = decode_video(clip, min_pixels=SMALL, max_pixels=28 * 28 * 40)
    h, w = smart_resize(224, 336, 28, SMALL, video_max_pixels(4, min_pixels=SMALL, max_pixels=28 * 28 * 40))
    assert (h, w) == (140, 196)  # beta = sqrt(75264 / 31360) = 1.55: floor(5.16), floor(7.75)
    assert out.frames.shape == (4, h, w, 3)
    assert torch.equal(torch.from_numpy(out.frames), resize_frames(picked, h, w))


def test_decode_short_clip_min_frames():
    data = make_video(seconds=5 / 30, fps=30, width=56, height=56)
    out = decode_video(data, min_pixels=SMALL)
    assert out.info.total_frames == 5
    assert out.indices == [0, 1, 3, 4]
    assert out.frames.shape == (4, 56, 56, 3)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (bytes(range(256)) * 40, "not a recognised video"),
        (make_image(fmt="PNG"), "still image"),
        (make_image(fmt="JPEG"), "still image"),
    ],
)
def test_bad_video_inputs(data, match):
    with pytest.raises(MediaError, match=match):
        probe_video(data)
    with pytest.raises(MediaError, match=match):
        decode_video(data)


def _audio_only_mp4() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def test_unsupported_streams():
    with pytest.raises(MediaError, match="no video stream"):
        probe_video(_audio_only_mp4())
    with pytest.raises(MediaError, match="unsupported codec 'ffv1'"):
        probe_video(make_video(codec="ffv1", container="mkv", seconds=0.2, width=64, height=48))
    with pytest.raises(MediaError, match="8200x16 exceeds the limit"):
        decode_video(make_video(seconds=0.1, width=8200, height=16, gop=1))


def test_truncated_mp4(clip):
    # moov at the end: cutting the file loses the index.
    with pytest.raises(MediaError, match="video:"):
        decode_video(clip[: len(clip) // 2])
    # moov at the front: the header is fine, the stream runs out mid-way.
    faststart = make_video(seconds=2.0, fps=30, width=336, height=224, faststart=True)
    assert probe_video(faststart[: len(faststart) // 2]).total_frames == 60
    with pytest.raises(MediaError, match=r"truncated.*t=\d+\.\d+s"):
        decode_video(faststart[: len(faststart) // 2], min_pixels=SMALL)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but whose pixel data is a few bytes."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("width", "height", "match"), [(9000, 9000, "over the limit"), (100000, 100000, "too large")])
def test_huge_png_rejected_before_decoding(width, height, match, monkeypatch):
    from PIL import ImageFile

    def no_decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(MediaError, match=match):
        decode_image(_png_header_only(width, height))


def test_decode_image_shapes():
    out = decode_image(make_image(width=640, height=480, fmt="JPEG"))
    assert out.shape == (1, 476, 644, 3) and out.dtype == np.uint8
    out = decode_image(make_image(width=640, height=480, fmt="PNG"), max_pixels=28 * 28 * 64)
    assert out.shape == (1, 168, 252, 3)  # beta = 2.47: floor(6.93) * 28, floor(9.24) * 28


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (bytes(range(256)) * 4, "not a JPEG, PNG, WebP or GIF"),
        (make_image(fmt="BMP"), "not a JPEG, PNG, WebP or GIF"),
        (make_image(width=300, height=200, fmt="JPEG")[:800], "truncated or corrupt JPEG"),
        (make_image(width=300, height=200, fmt="PNG")[:2000], "truncated or corrupt PNG"),
    ],
)
def test_bad_image_inputs(data, match):
    with pytest.raises(MediaError, match=match):
        decode_image(data)


def test_video_given_to_decode_image(clip):
    with pytest.raises(MediaError, match="not a JPEG, PNG, WebP or GIF"):
        decode_image(clip)
