"""The Decoder gRPC servicer: encoded media in, a stream of chunks of sampled, resized frames out."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc

from mmserve import transport
from mmserve.media.errors import MediaError
from mmserve.media.fetch import check_unchanged, resolve_file_uri
from mmserve.v1 import decoder_pb2, decoder_pb2_grpc
from services.decoder.config import DecoderConfig
from services.decoder.engine import DecodedChunk, DecodeEngine, ScratchFull, VideoOptions, fault_injection_enabled
from services.decoder.pool import WorkerCrashed, WorkerError, WorkerTimeout
from services.decoder.taken import TakenWatch

_FAULT_PREFIX = "fault:"


class DecoderServicer(decoder_pb2_grpc.DecoderServicer):
    def __init__(self, config: DecoderConfig, engine: DecodeEngine):
        self.config = config
        self.engine = engine
        self.allow_faults = fault_injection_enabled()
        self._watch: TakenWatch | None = None  # made on the event loop, at the first request

    def close(self) -> None:
        """Stops watching for taken chunks."""
        if self._watch is not None:
            self._watch.close()

    def _source(self, request: decoder_pb2.DecodeRequest) -> bytes | Path:
        if request.WhichOneof("source") == "uri":
            path = resolve_file_uri(request.uri, media_root=self.config.media_root,
                                    max_bytes=self.config.max_media_bytes)
            check_unchanged(path, request.uri, size=request.file_size, mtime_ns=request.file_mtime_ns)
            return path
        data = request.data  # each read of the field is a copy
        if len(data) > self.config.max_media_bytes:
            raise MediaError(f"media: {len(data)} bytes exceed the {self.config.max_media_bytes} byte limit")
        return data

    def _fault(self, request: decoder_pb2.DecodeRequest) -> str:
        if self.allow_faults and request.request_id.startswith(_FAULT_PREFIX):
            return request.request_id.removeprefix(_FAULT_PREFIX)
        return ""

    async def _chunks(self, request: decoder_pb2.DecodeRequest):
        source = await asyncio.to_thread(self._source, request)
        if request.kind == decoder_pb2.MEDIA_KIND_IMAGE:
            yield await self.engine.decode_image(source, min_pixels=request.min_pixels,
                                                 max_pixels=request.max_pixels, fault=self._fault(request))
            return
        if request.kind != decoder_pb2.MEDIA_KIND_VIDEO:
            raise MediaError("kind: must be image or video")
        options = VideoOptions(fps=request.fps, min_frames=request.min_frames, max_frames=request.max_frames,
                               min_pixels=request.min_pixels, max_pixels=request.max_pixels,
                               total_pixels=request.total_pixels)
        video = self.engine.decode_video(source, options, chunk_frames=request.chunk_frames,
                                         chunk_indices=list(request.chunk_indices),
                                         max_chunks_ahead=request.max_chunks_ahead, fault=self._fault(request))
        async with contextlib.aclosing(video) as it:
            async for chunk in it:
                yield chunk

    async def _when_taken(self, ref, taken) -> None:
        await self._watch.wait(ref)
        taken()

    async def Decode(self, request: decoder_pb2.DecodeRequest, context: grpc.aio.ServicerContext):
        kind = "image" if request.kind == decoder_pb2.MEDIA_KIND_IMAGE else "video"
        if self._watch is None:
            self._watch = TakenWatch(transport.current_store())
        watches: set[asyncio.Task] = set()
        try:
            async with contextlib.aclosing(self._chunks(request)) as chunks:
                async for chunk in chunks:
                    message = await asyncio.to_thread(_message, chunk)
                    # The next chunk may decode once the consumer has taken this one's frames, not merely got
                    # the message: see taken.py.
                    watch = asyncio.ensure_future(self._when_taken(message.frames, chunk.taken))
                    watches.add(watch)
                    watch.add_done_callback(watches.discard)
                    del chunk  # its frames are in the message's segment now
                    yield message
        except MediaError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except (WorkerCrashed, WorkerTimeout) as err:
            # Only untrusted media runs in the worker, so the media is the likely culprit; the service is fine.
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{kind}: {err}")
        except ScratchFull as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{kind}: {err}")
        except WorkerError as err:
            await context.abort(grpc.StatusCode.INTERNAL, f"{kind}: decoder failure: {err}")
        finally:
            for watch in list(watches):
                watch.cancel()


def _message(chunk: DecodedChunk) -> decoder_pb2.DecodeChunk:
    """The wire form of a chunk (copies the frames into the TensorRef; run off the event loop)."""
    return decoder_pb2.DecodeChunk(chunk_index=chunk.index, num_chunks=chunk.num_chunks,
                                   frames=transport.to_ref(chunk.frames), frame_indices=chunk.frame_indices,
                                   sample_fps=chunk.sample_fps, decode_ms=chunk.decode_ms, video_fps=chunk.video_fps,
                                   grid=chunk.grid)
