"""Video probing from container headers (PyAV, no pixels decoded, no torch): what the router plans a video's
frames and grid from, and the decoder starts from."""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction

import av

from mmserve.media.errors import MediaError

MAX_VIDEO_SIDE = 8192
# FFmpeg demuxer name tokens we accept ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", ...).
SUPPORTED_CONTAINERS = frozenset({"mov", "mp4", "matroska", "webm", "avi", "mpegts"})
SUPPORTED_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mpeg2video", "mjpeg"})


@dataclass(frozen=True)
class VideoInfo:
    """Container/stream facts read without decoding pixels."""

    total_frames: int
    fps: float
    width: int
    height: int
    duration_s: float
    codec: str
    container: str


def open_container(data: bytes | str) -> av.container.InputContainer:
    """Open a container from memory (bytes) or a file path, mapping failures to MediaError."""
    if not data:
        raise MediaError("video: empty data")
    try:
        return av.open(io.BytesIO(data) if isinstance(data, bytes) else data, mode="r")
    except av.error.FFmpegError as e:
        raise MediaError(f"video: not a recognised video container, or the data is truncated ({error_reason(e)})") from None


def error_reason(e: Exception) -> str:
    """Short description of an FFmpeg/PyAV error."""
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def check_header(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The video stream, after checking container, codec and frame size from the headers alone."""
    fmt = container.format.name
    tokens = set(fmt.split(","))
    if fmt.endswith("_pipe") or fmt == "image2":
        raise MediaError(f"video: got a still image ({fmt.removesuffix('_pipe')}), not a video")
    if not tokens & SUPPORTED_CONTAINERS:
        raise MediaError(f"video: unsupported container '{fmt}' (expected MP4/MOV, Matroska/WebM, AVI or MPEG-TS)")
    if not container.streams.video:
        raise MediaError(f"video: the {fmt} container has no video stream")
    stream = container.streams.video[0]
    codec = codec_name(stream)
    if codec not in SUPPORTED_CODECS:
        raise MediaError(f"video: unsupported codec '{codec}' (supported: {', '.join(sorted(SUPPORTED_CODECS))})")
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise MediaError(f"video: invalid frame size {width}x{height}")
    if width > MAX_VIDEO_SIDE or height > MAX_VIDEO_SIDE:
        raise MediaError(f"video: frame size {width}x{height} exceeds the limit of {MAX_VIDEO_SIDE}x{MAX_VIDEO_SIDE}")
    return stream


def codec_name(stream: av.video.stream.VideoStream) -> str:
    """The codec's own name ("av1"), not the decoder's ("libdav1d")."""
    return stream.codec_context.codec.canonical_name


def frame_rate(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if not 0 < fps <= 1000:
        raise MediaError(f"video: invalid or missing frame rate ({rate})")
    return fps


def header_duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * Fraction(stream.time_base))
    return (container.duration or 0) / av.time_base


def video_info(container, stream, total_frames: int, fps: float, duration_s: float) -> VideoInfo:
    if total_frames <= 0:
        raise MediaError("video: the video stream has no frames")
    return VideoInfo(total_frames, fps, stream.codec_context.width, stream.codec_context.height,
                     duration_s or total_frames / fps, codec_name(stream), container.format.name)


def _probe(container: av.container.InputContainer) -> VideoInfo:
    """Read VideoInfo from an open container (may demux, never decodes)."""
    stream = check_header(container)
    fps = frame_rate(stream)
    total_frames = stream.frames
    if not total_frames:
        # Matroska/WebM and some others carry no frame count: count packets, which demuxes but decodes nothing.
        try:
            total_frames = sum(1 for packet in container.demux(stream) if packet.size)
        except av.error.FFmpegError as e:
            raise MediaError(f"video: truncated or corrupt container while counting frames ({error_reason(e)})") from None
    return video_info(container, stream, total_frames, fps, header_duration(container, stream))


def probe_video(data: bytes) -> VideoInfo:
    """Frame count, fps, size, duration, codec and container of a video, without decoding pixels."""
    container = open_container(data)
    try:
        return _probe(container)
    finally:
        container.close()
