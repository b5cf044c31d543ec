"""The Decoder gRPC servicer: encoded media in, chunks of sampled, resized frames out."""

from __future__ import annotations

import asyncio
import time

import grpc

from mmserve import transport
from mmserve.media.fetch import read_uri
from mmserve.media.image import decode_image
from mmserve.media.preprocess import MediaError
from mmserve.media.video import decode_video
from mmserve.v1 import decoder_pb2, decoder_pb2_grpc
from services.decoder.config import DecoderConfig


class DecoderServicer(decoder_pb2_grpc.DecoderServicer):
    def __init__(self, config: DecoderConfig):
        self.config = config
        self.slots = asyncio.Semaphore(config.max_concurrent_decodes)

    def _decode(self, request: decoder_pb2.DecodeRequest) -> tuple:
        if request.WhichOneof("source") == "uri":
            data = read_uri(request.uri, media_root=self.config.media_root, max_bytes=self.config.max_media_bytes)
        else:
            data = request.data
        if len(data) > self.config.max_media_bytes:
            raise MediaError(f"media: {len(data)} bytes exceed the {self.config.max_media_bytes} byte limit")
        if request.kind == decoder_pb2.MEDIA_KIND_IMAGE:
            frames = decode_image(data, min_pixels=request.min_pixels, max_pixels=request.max_pixels)
            return frames, [0], 0.0
        if request.kind == decoder_pb2.MEDIA_KIND_VIDEO:
            video = decode_video(data, fps=request.fps, min_frames=request.min_frames,
                                 max_frames=request.max_frames, min_pixels=request.min_pixels,
                                 max_pixels=request.max_pixels, total_pixels=request.total_pixels,
                                 threads=self.config.ffmpeg_threads)
            return video.frames, video.indices, video.sample_fps
        raise MediaError("kind: must be image or video")

    async def Decode(self, request: decoder_pb2.DecodeRequest, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        try:
            async with self.slots:
                frames, indices, sample_fps = await asyncio.to_thread(self._decode, request)
        except MediaError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        yield decoder_pb2.DecodeChunk(chunk_index=0, num_chunks=1, frames=transport.to_ref(frames),
                                      frame_indices=indices, sample_fps=sample_fps,
                                      decode_ms=(time.perf_counter() - start) * 1e3)
