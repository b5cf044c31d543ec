"""The Encoder gRPC servicer: frames in, vision embeddings out."""

from __future__ import annotations

import asyncio
import time

import grpc

from mmserve import transport
from mmserve.media.preprocess import ImageProcessing, to_pixel_values
from mmserve.v1 import encoder_pb2, encoder_pb2_grpc
from services.encoder.batcher import Batcher, EncoderOverloaded


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    def __init__(self, batcher: Batcher, processing: ImageProcessing):
        self.batcher = batcher
        self.processing = processing

    def _pixel_values(self, ref):
        p = self.processing
        frames = transport.from_ref(ref)
        return to_pixel_values(frames, patch_size=p.patch_size, temporal_patch_size=p.temporal_patch_size,
                               merge_size=p.merge_size, image_mean=p.image_mean, image_std=p.image_std,
                               rescale_factor=p.rescale_factor)

    async def Encode(self, request: encoder_pb2.EncodeRequest, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        try:
            pixel_values, grid = await asyncio.to_thread(self._pixel_values, request.frames)
            embeddings = await self.batcher.encode(pixel_values, grid)
        except ValueError as err:  # includes TensorRefError and bad frame shapes
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"frames: {err}")
        except EncoderOverloaded as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        return encoder_pb2.EncodeResponse(embeddings=transport.to_ref(embeddings), grid_thw=list(grid),
                                          encode_ms=(time.perf_counter() - start) * 1e3)
