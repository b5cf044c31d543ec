"""Deterministic synthetic images and videos for tests, demos and benchmarks."""

from __future__ import annotations

import io
import os
import tempfile

import av
import numpy as np
from PIL import Image

# Friendly codec names -> PyAV encoder names.
_ENCODERS = {
    "h264": "libx264",
    "libx264": "libx264",
    "hevc": "libx265",
    "h265": "libx265",
    "libx265": "libx265",
    "mpeg4": "mpeg4",
    "vp9": "libvpx-vp9",
    "libvpx-vp9": "libvpx-vp9",
    "av1": "libsvtav1",
    "libsvtav1": "libsvtav1",
}
_ENCODER_OPTIONS = {
    "libx264": {"preset": "veryfast"},
    "libx265": {"x265-params": "log-level=none:pools=1:frame-threads=1"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8"},
}
_CONTAINER_FORMATS = {
    "mp4": "mp4", "mov": "mov", "mkv": "matroska", "matroska": "matroska", "webm": "webm", "avi": "avi",
}


def _frame_rgb(i: int, fps: float, width: int, height: int, noise: np.ndarray) -> np.ndarray:
    """One frame: a scrolling gradient, two moving shapes and a little noise."""
    t = i / fps
    xs = np.arange(width, dtype=np.float32)[None, :]
    ys = np.arange(height, dtype=np.float32)[:, None]
    img = np.empty((height, width, 3), dtype=np.float32)
    img[..., 0] = 127.5 + 127.5 * np.sin(2 * np.pi * (xs / width + 0.5 * t))
    img[..., 1] = 255.0 * ((ys / max(height - 1, 1) + 0.25 * t) % 1.0)
    # cos(a + b) as outer products of 1-D terms: much cheaper than a 2-D cos.
    a = 2 * np.pi * (xs / (width + height) - 0.3 * t)
    b = 2 * np.pi * ys / (width + height)
    img[..., 2] = 127.5 + 127.5 * (np.cos(b) * np.cos(a) - np.sin(b) * np.sin(a))
    # A white square moving left to right and a red disc moving on a circle.
    side = max(4, min(width, height) // 6)
    sx = int((width - side) * ((0.4 * t) % 1.0))
    sy = (height - side) // 3
    img[sy:sy + side, sx:sx + side] = 255.0
    cx = width / 2 + width / 4 * np.cos(2 * np.pi * 0.5 * t)
    cy = height / 2 + height / 4 * np.sin(2 * np.pi * 0.5 * t)
    disc = (xs - cx) ** 2 + (ys - cy) ** 2 <= (side / 2) ** 2
    img[disc] = (230.0, 30.0, 30.0)
    img += noise
    return np.clip(img, 0, 255).astype(np.uint8)


def _noise_bank(rng: np.random.Generator, width: int, height: int, count: int = 4) -> list[np.ndarray]:
    """A few noise fields, cycled across frames (drawing fresh noise per frame is slow for long clips)."""
    return [rng.integers(-12, 13, size=(height, width, 3), dtype=np.int8) for _ in range(count)]


def make_video(
    *,
    seconds: float = 2.0,
    fps: int = 30,
    width: int = 320,
    height: int = 240,
    codec: str = "h264",
    gop: int = 30,
    container: str = "mp4",
    seed: int = 0,
    faststart: bool = False,
    encoder_options: dict[str, str] | None = None,
) -> bytes:
    """Encode a deterministic synthetic yuv420p clip and return the container bytes.

    encoder_options override the defaults, e.g. {"x264-params": "bframes=3:b-adapt=0:open-gop=1"}.
    """
    encoder = _ENCODERS.get(codec, codec)
    fmt = _CONTAINER_FORMATS.get(container, container)
    noise = _noise_bank(np.random.default_rng(seed), width, height)
    nframes = max(1, round(seconds * fps))
    # bitexact drops muxer timestamps/UIDs so equal inputs give equal bytes.
    options = {"fflags": "+bitexact"}
    if faststart and fmt in ("mp4", "mov"):
        options["movflags"] = "+faststart"
    # faststart rewrites the file in a second pass, which needs a real file rather than BytesIO.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"clip.{container}")
        with av.open(path, mode="w", format=fmt, options=options) as out:
            stream = out.add_stream(encoder, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.gop_size = gop
            # One encoder thread keeps the bitstream identical from run to run.
            stream.codec_context.thread_count = 1
            stream.codec_context.options = {**_ENCODER_OPTIONS.get(encoder, {}), **(encoder_options or {})}
            for i in range(nframes):
                rgb = _frame_rgb(i, fps, width, height, noise[i % len(noise)])
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = i
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
        with open(path, "rb") as f:
            return f.read()


def make_image(*, width: int = 64, height: int = 48, fmt: str = "PNG", seed: int = 0, mode: str = "RGB") -> bytes:
    """Encode a deterministic synthetic image (gradient, shape, noise; random alpha for RGBA/LA)."""
    rgb = _frame_rgb(seed, 10.0, width, height, _noise_bank(np.random.default_rng(seed), width, height, 1)[0])
    img = Image.fromarray(rgb, "RGB")
    if mode in ("RGBA", "LA"):
        ys, xs = np.mgrid[0:height, 0:width]
        alpha = ((xs * 255 // max(width - 1, 1)) ^ (ys * 7)).astype(np.uint8)
        alpha[: height // 4] = 0  # a fully transparent band, so GIF keeps a transparency index
        img = img.convert("L" if mode == "LA" else "RGB")
        img.putalpha(Image.fromarray(alpha, "L"))
    elif mode == "P":
        img = img.quantize(colors=64, dither=Image.Dither.NONE)
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    if fmt.upper() == "GIF" and img.mode not in ("P", "L", "RGBA"):
        img = img.convert("RGB").quantize(colors=128, dither=Image.Dither.NONE)
    save_kwargs = {"quality": 90} if fmt.upper() in ("JPEG", "JPG", "WEBP") else {}
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()
