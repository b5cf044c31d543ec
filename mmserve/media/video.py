"""Video probing and frame sampling with PyAV, following qwen-vl-utils' fetch_video."""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction

import av
import torch

from mmserve.media.preprocess import (
    FPS,
    FPS_MAX_FRAMES,
    FPS_MIN_FRAMES,
    IMAGE_FACTOR,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VIDEO_TOTAL_PIXELS,
    MediaError,
    resize_frames,
    sample_frame_indices,
    smart_resize,
    video_max_pixels,
)

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


@dataclass(frozen=True)
class DecodedVideo:
    """Sampled, resized frames (uint8 [T,H,W,3]) plus how they were chosen."""

    frames: torch.Tensor
    indices: list[int]
    sample_fps: float
    info: VideoInfo


def _open(data: bytes | str) -> av.container.InputContainer:
    """Open a container from memory (bytes) or a file path, mapping failures to MediaError."""
    if not data:
        raise MediaError("video: empty data")
    try:
        return av.open(io.BytesIO(data) if isinstance(data, bytes) else data, mode="r")
    except av.error.FFmpegError as e:
        raise MediaError(f"video: not a recognised video container, or the data is truncated ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    """Short description of an FFmpeg/PyAV error."""
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _check_header(container: av.container.InputContainer) -> av.video.stream.VideoStream:
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
    codec = _codec_name(stream)
    if codec not in SUPPORTED_CODECS:
        raise MediaError(f"video: unsupported codec '{codec}' (supported: {', '.join(sorted(SUPPORTED_CODECS))})")
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise MediaError(f"video: invalid frame size {width}x{height}")
    if width > MAX_VIDEO_SIDE or height > MAX_VIDEO_SIDE:
        raise MediaError(f"video: frame size {width}x{height} exceeds the limit of {MAX_VIDEO_SIDE}x{MAX_VIDEO_SIDE}")
    return stream


def _codec_name(stream: av.video.stream.VideoStream) -> str:
    """The codec's own name ("av1"), not the decoder's ("libdav1d")."""
    return stream.codec_context.codec.canonical_name


def _fps(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if not 0 < fps <= 1000:
        raise MediaError(f"video: invalid or missing frame rate ({rate})")
    return fps


def _header_duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * Fraction(stream.time_base))
    return (container.duration or 0) / av.time_base


def _info(container, stream, total_frames: int, fps: float, duration_s: float) -> VideoInfo:
    if total_frames <= 0:
        raise MediaError("video: the video stream has no frames")
    return VideoInfo(total_frames, fps, stream.codec_context.width, stream.codec_context.height,
                     duration_s or total_frames / fps, _codec_name(stream), container.format.name)


def _probe(container: av.container.InputContainer) -> VideoInfo:
    """Read VideoInfo from an open container (may demux, never decodes)."""
    stream = _check_header(container)
    fps = _fps(stream)
    total_frames = stream.frames
    if not total_frames:
        # Matroska/WebM and some others carry no frame count: count packets, which demuxes but decodes nothing.
        try:
            total_frames = sum(1 for packet in container.demux(stream) if packet.size)
        except av.error.FFmpegError as e:
            raise MediaError(f"video: truncated or corrupt container while counting frames ({_reason(e)})") from None
    return _info(container, stream, total_frames, fps, _header_duration(container, stream))


def probe_video(data: bytes) -> VideoInfo:
    """Frame count, fps, size, duration, codec and container of a video, without decoding pixels."""
    container = _open(data)
    try:
        return _probe(container)
    finally:
        container.close()


@dataclass(frozen=True)
class VideoIndex:
    """Probe facts plus each video packet's pts and keyframe flag, in decode order (no pixels decoded)."""

    info: VideoInfo
    pts: list[int | None]
    is_key: list[bool]
    has_discarded: bool  # packets the demuxer marks to drop (edit lists): frame counts then differ


def index_video(source: bytes | str, *, max_frames: int, max_seconds: float) -> VideoIndex:
    """Read the packet index of a video, refusing it early when it is longer than the limits."""
    container = _open(source)
    try:
        stream = _check_header(container)
        fps = _fps(stream)
        duration_s = _header_duration(container, stream)
        _check_length(duration_s, stream.frames, max_frames, max_seconds)
        pts, is_key, has_discarded = [], [], False
        try:
            for packet in container.demux(stream):
                if not packet.size:
                    continue
                pts.append(packet.pts)
                is_key.append(packet.is_keyframe)
                has_discarded |= packet.is_discard
                if len(pts) > max_frames:
                    _check_length(0.0, len(pts), max_frames, max_seconds)
        except av.error.FFmpegError as e:
            raise MediaError(f"video: truncated or corrupt container after {len(pts)} packets ({_reason(e)})") from None
        info = _info(container, stream, stream.frames or len(pts), fps, duration_s)
        _check_length(info.duration_s, info.total_frames, max_frames, max_seconds)
        return VideoIndex(info, pts, is_key, has_discarded)
    finally:
        container.close()


def _check_length(duration_s: float, num_frames: int, max_frames: int, max_seconds: float) -> None:
    if duration_s > max_seconds:
        raise MediaError(f"video: {duration_s:.1f} s long, over the limit of {max_seconds:g} s")
    if num_frames > max_frames:
        raise MediaError(f"video: more than {max_frames} frames, over the limit")


def decode_video(
    data: bytes,
    *,
    fps: float = FPS,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int = FPS_MAX_FRAMES,
    min_pixels: float = VIDEO_MIN_PIXELS,
    max_pixels: float = VIDEO_MAX_PIXELS,
    total_pixels: float = VIDEO_TOTAL_PIXELS,
    threads: int = 1,
) -> DecodedVideo:
    """Sample frames as qwen-vl-utils does (linspace over the clip) and resize them to the Qwen2.5-VL grid."""
    info = probe_video(data)
    indices, sample_fps = sample_frame_indices(
        info.total_frames, info.fps, fps=fps, min_frames=min_frames, max_frames=max_frames
    )
    budget = video_max_pixels(len(indices), min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels)
    out_h, out_w = smart_resize(info.height, info.width, IMAGE_FACTOR, min_pixels, budget)
    frames = torch.empty((len(indices), out_h, out_w, 3), dtype=torch.uint8)
    container = _open(data)
    filled, frame_index, reached = 0, -1, 0.0
    try:
        stream = container.streams.video[0]
        stream.thread_count = threads
        if threads > 1:
            stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            frame_index += 1
            reached = frame.time if frame.time is not None else frame_index / info.fps
            if frame_index != indices[filled]:
                continue
            # Scale to the probed size in case the stream changes resolution mid-way (no-op otherwise).
            rgb = frame.to_ndarray(format="rgb24", width=info.width, height=info.height)
            resized = resize_frames(torch.from_numpy(rgb).unsqueeze(0), out_h, out_w)[0]
            # linspace rounding may repeat an index: emit the frame once per occurrence.
            while filled < len(indices) and indices[filled] == frame_index:
                frames[filled] = resized
                filled += 1
            if filled == len(indices):
                break
    except av.error.FFmpegError as e:
        raise MediaError(
            f"video: truncated or corrupt stream: decoding failed after {frame_index + 1} frames "
            f"(t={reached:.2f}s of {info.duration_s:.2f}s), {filled} of {len(indices)} sampled frames read "
            f"({_reason(e)})"
        ) from None
    finally:
        container.close()
    if filled < len(indices):
        raise MediaError(
            f"video: truncated stream: only {frame_index + 1} of {info.total_frames} frames decoded "
            f"(reached t={reached:.2f}s of {info.duration_s:.2f}s); frame {indices[filled]} was needed"
        )
    return DecodedVideo(frames=frames, indices=indices, sample_fps=sample_fps, info=info)
