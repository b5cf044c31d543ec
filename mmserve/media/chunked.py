"""Decodes one planned chunk with PyAV: seek to each span's keyframe, decode its packets, keep the targets."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import av
import numpy as np

from mmserve.media.plan import Span
from mmserve.media.errors import MediaError
from mmserve.media.probe import error_reason, open_container
from mmserve.media.resize import resize_frame

# Decoders that honour skip_frame=NONREF per packet, so frames nothing references can be skipped unseen.
SKIP_NONREF_CODECS = frozenset({"h264", "hevc"})


class _Targets:
    """Where each wanted pts goes in the output, and which are still missing."""

    def __init__(self, frame_pts: Sequence[int], out: np.ndarray, width: int, height: int):
        self.slots: dict[int, list[int]] = {}
        for i, p in enumerate(frame_pts):
            self.slots.setdefault(p, []).append(i)
        self.pending = set(self.slots)
        self.out, self.width, self.height = out, width, height

    def take(self, frame: av.VideoFrame) -> None:
        """Converts and resizes frame into its output slots if it is wanted (as decode_video does)."""
        if frame.pts not in self.pending:
            return
        # Scale to the probed size in case the stream changes resolution mid-way (no-op otherwise).
        rgb = frame.to_ndarray(format="rgb24", width=self.width, height=self.height)
        first, *copies = self.slots[frame.pts]
        resize_frame(rgb, *self.out.shape[1:3], out=self.out[first])
        for i in copies:
            self.out[i] = self.out[first]
        self.pending.discard(frame.pts)


def decode_chunk(source: bytes | str, spans: Sequence[Span], frame_pts: Sequence[int], out: np.ndarray, *,
                 width: int, height: int, threads: int = 1, skip_nonref: bool = True) -> None:
    """Fills out[i] ([n,H,W,3] uint8) with the frame shown at frame_pts[i], resized; MediaError if one is missing."""
    targets = _Targets(frame_pts, out, width, height)
    container = open_container(source)
    try:
        stream = container.streams.video[0]
        codec = stream.codec_context
        codec.thread_count = threads
        if threads > 1:
            stream.thread_type = "AUTO"
        can_skip = skip_nonref and codec.codec.canonical_name in SKIP_NONREF_CODECS
        for n, span in enumerate(spans):
            _decode_span(container, stream, span, targets, at_start=n == 0 and span.start == 0, can_skip=can_skip)
    except av.error.FFmpegError as e:
        raise MediaError(f"video: corrupt stream while decoding sampled frames ({error_reason(e)})") from None
    finally:
        container.close()
    if targets.pending:
        missing = sorted(targets.pending)
        raise MediaError(f"video: truncated or corrupt stream: {len(missing)} of {len(frame_pts)} sampled frames "
                         f"could not be decoded (first missing pts {missing[0]})")


def _decode_span(container, stream, span: Span, targets: _Targets, *, at_start: bool, can_skip: bool) -> None:
    """Feeds packets [span.start, span.stop) to the decoder, then drains it."""
    codec = stream.codec_context
    num_fed = 0
    for packet in _packets_from_key(container, stream, span.key_pts, at_start):
        if can_skip:
            # A frame nothing references and nobody wants need not be decoded at all.
            codec.skip_frame = "DEFAULT" if packet.pts in targets.pending else "NONREF"
        for frame in codec.decode(packet):
            targets.take(frame)
        num_fed += 1
        if num_fed == span.stop - span.start:
            break
    codec.skip_frame = "DEFAULT"
    for frame in codec.decode(None):
        targets.take(frame)
    codec.flush_buffers()


def _packets_from_key(container, stream, key_pts: int, at_start: bool) -> Iterator[av.Packet]:
    """Video packets from the one with pts key_pts on (seeking there unless the container is at the start)."""
    if at_start:
        yield from (p for p in container.demux(stream) if p.size)
        return
    for attempt in range(2):
        if attempt == 0:
            container.seek(key_pts, stream=stream, backward=True, any_frame=False)
        else:
            container.seek(0)  # the seek overshot: scan from the start instead
        found = False
        for packet in container.demux(stream):
            if not packet.size:
                continue
            if not found:
                if packet.pts != key_pts:
                    # Seeks land on a keyframe; one shown after ours means we are already past it.
                    if attempt == 0 and packet.is_keyframe and packet.pts is not None and packet.pts > key_pts:
                        break
                    continue
                found = True
            yield packet
        if found:
            return
    raise MediaError(f"video: cannot find the keyframe at pts {key_pts}; the container index may be corrupt")
