"""`python -m services.encoder`: runs the encoder service."""

from __future__ import annotations

import asyncio

import torch

from mmserve import rpc
from mmserve.cache import EmbeddingCache
from mmserve.models import loading
from mmserve.models.family import family_of
from mmserve.roles import Role
from mmserve.v1 import encoder_pb2, encoder_pb2_grpc
from services.encoder.batcher import Batcher
from services.encoder.config import EncoderConfig
from services.encoder.server import EncoderServicer


async def build_encoder(config: EncoderConfig, arbiter=None) -> Role:
    """Loads the vision tower only and builds the encoder's server (not yet serving); on a unified replica its
    batches take turns with the llm's steps through arbiter."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = loading.resolve_device(config.device)
    family = family_of(config.model)
    tower = family.load_vision_tower(config.model, loading.resolve_dtype(config.dtype, config.model, device), device)
    batcher = Batcher(tower, family.encode, config.max_batch_patches, config.max_queue, arbiter, config.num_threads)
    batcher.start()
    service = rpc.Service(config, [encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name])
    cache = EmbeddingCache.from_options(config)
    servicer = EncoderServicer(batcher, family, cache)
    encoder_pb2_grpc.add_EncoderServicer_to_server(servicer, service.server)

    async def stop() -> None:
        await batcher.stop()
        if cache is not None:
            await cache.close()

    return Role(service, on_stop=stop)


async def run_encoder_process(config: EncoderConfig) -> None:
    """Serves the vision tower until SIGTERM; writes embeddings to the cache when it has one."""
    await (await build_encoder(config)).run_until_signalled()


def main(argv: list[str] | None = None) -> None:
    config = EncoderConfig.parse(argv, prog="mmserve-encoder")
    rpc.setup_logging(config.log_level)
    rpc.lower_priority(config.nice)
    asyncio.run(run_encoder_process(config))


if __name__ == "__main__":
    main()
