"""Video probing and frame sampling with PyAV, following qwen-vl-utils' fetch_video."""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np

from mmserve.media.plan import VideoIndex
from mmserve.media.probe import (  # noqa: F401  (VideoInfo and probe_video re-exported)
    VideoInfo,
    check_header,
    error_reason,
    frame_rate,
    header_duration,
    open_container,
    probe_video,
    video_info,
)
from mmserve.media.errors import MediaError
from mmserve.media.resize import resize_frame
from mmserve.media.sizing import (
    FPS,
    FPS_MAX_FRAMES,
    FPS_MIN_FRAMES,
    IMAGE_FACTOR,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VIDEO_TOTAL_PIXELS,
    sample_frame_indices,
    smart_resize,
    video_max_pixels,
)


@dataclass(frozen=True)
class DecodedVideo:
    """Sampled, resized frames (uint8 [T,H,W,3]) plus how they were chosen."""

    frames: np.ndarray
    indices: list[int]
    sample_fps: float
    info: VideoInfo


def index_video(source: bytes | str, *, max_frames: int, max_seconds: float) -> VideoIndex:
    """Read the packet index of a video, refusing it early when it is longer than the limits."""
    container = open_container(source)
    try:
        stream = check_header(container)
        fps = frame_rate(stream)
        duration_s = header_duration(container, stream)
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
            raise MediaError(f"video: truncated or corrupt container after {len(pts)} packets ({error_reason(e)})") from None
        info = video_info(container, stream, stream.frames or len(pts), fps, duration_s)
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
    indices: list[int] | None = None,
    size: tuple[int, int] | None = None,
) -> DecodedVideo:
    """Sample frames as qwen-vl-utils does (linspace over the clip) and resize them to the Qwen2.5-VL grid, or
    keep the given frame indices (ascending) resized to size (height, width): another family's plan."""
    info = probe_video(data)
    if indices is None or size is None:
        indices, _ = sample_frame_indices(info.total_frames, info.fps, fps=fps, min_frames=min_frames,
                                          max_frames=max_frames)
        budget = video_max_pixels(len(indices), min_pixels=min_pixels, max_pixels=max_pixels,
                                  total_pixels=total_pixels)
        size = smart_resize(info.height, info.width, IMAGE_FACTOR, min_pixels, budget)
    sample_fps = len(indices) / max(info.total_frames, 1e-6) * info.fps
    out_h, out_w = size
    frames = np.empty((len(indices), out_h, out_w, 3), dtype=np.uint8)
    container = open_container(data)
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
            first = filled
            resize_frame(rgb, out_h, out_w, out=frames[first])
            filled += 1
            # linspace rounding may repeat an index: emit the frame once per occurrence.
            while filled < len(indices) and indices[filled] == frame_index:
                frames[filled] = frames[first]
                filled += 1
            if filled == len(indices):
                break
    except av.error.FFmpegError as e:
        raise MediaError(
            f"video: truncated or corrupt stream: decoding failed after {frame_index + 1} frames "
            f"(t={reached:.2f}s of {info.duration_s:.2f}s), {filled} of {len(indices)} sampled frames read "
            f"({error_reason(e)})"
        ) from None
    finally:
        container.close()
    if filled < len(indices):
        raise MediaError(
            f"video: truncated stream: only {frame_index + 1} of {info.total_frames} frames decoded "
            f"(reached t={reached:.2f}s of {info.duration_s:.2f}s); frame {indices[filled]} was needed"
        )
    return DecodedVideo(frames=frames, indices=indices, sample_fps=sample_fps, info=info)
