"""Crafted media for the bad-input suite: headers that lie about their size, bombs, truncations, odd codecs."""

from __future__ import annotations

import functools
import io
import struct
import zlib

import av
import numpy as np
from PIL import Image

from mmserve.media.samples import make_image, make_video


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int, idat: bytes, *, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A PNG whose IHDR claims width x height, with the given (compressed) IDAT payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png_bomb(side: int) -> bytes:
    """A valid 1-bit PNG of side x side black pixels: kilobytes that decode to side² pixels."""
    row = side // 8 + 1  # filter byte plus packed bits
    return png_header(side, side, zlib.compress(bytes(row * side), 9), bit_depth=1, color_type=0)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 header is patched to claim width x height."""
    data = bytearray(make_image(width=32, height=32, fmt="JPEG"))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def gif_with_screen(width: int, height: int) -> bytes:
    """A GIF with a width x height logical screen and a single 1x1 image in it."""
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b"\x3b"


def webp_canvas(width: int, height: int) -> bytes:
    """An extended WebP header (VP8X) claiming a width x height canvas."""
    vp8x = struct.pack("<I", 0) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


def still(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format=fmt)
    return buf.getvalue()


@functools.cache
def encode(codec: str | None, fmt: str, *, pix_fmt: str = "yuv420p", frames: int = 4, width: int = 32,
           height: int = 32, fps: int = 4, audio: str | None = None) -> bytes:
    """A tiny clip in any codec/container PyAV can write (codec None: audio only)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        if audio:
            sound = out.add_stream(audio, rate=16000)
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            samples.sample_rate, samples.pts = 16000, 0
            out.mux(sound.encode(samples))
            out.mux(sound.encode(None))
        if codec:
            stream = out.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
            for i in range(frames):
                frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), i * 40 % 256, np.uint8), format="rgb24")
                frame.pts = i
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
    return buf.getvalue()


def avi_claiming_frames(num_frames: int, fps: int) -> bytes:
    """A real 8-frame AVI whose headers (avih total frames, strh length) claim num_frames."""
    data = bytearray(encode("mpeg4", "avi", frames=8, fps=fps))
    struct.pack_into("<I", data, data.find(b"avih") + 8 + 16, num_frames)
    struct.pack_into("<I", data, data.find(b"strh") + 8 + 32, num_frames)
    return bytes(data)


def mkv_claiming_seconds(seconds: float) -> bytes:
    """A real 8-frame Matroska clip whose segment Duration element claims seconds."""
    data = bytearray(encode("mpeg4", "matroska", frames=8))
    at = data.find(b"\x44\x89")  # Duration, a float in milliseconds
    size = data[at + 2]
    struct.pack_into(">d" if size == 0x88 else ">f", data, at + 3, seconds * 1000)
    return bytes(data)


@functools.cache
def clip(faststart: bool) -> bytes:
    return make_video(seconds=1.0, fps=8, width=64, height=48, gop=4, faststart=faststart)


def corrupt(data: bytes, at: float, length: int = 64) -> bytes:
    """data with length bytes from the fraction at overwritten by 0xff."""
    start = int(len(data) * at)
    return data[:start] + b"\xff" * length + data[start + length:]
