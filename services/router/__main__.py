"""`python -m services.router`: runs the public router service."""

from __future__ import annotations

import asyncio

from mmserve import rpc
from mmserve.cache import EmbeddingCache
from mmserve.cache_keys import model_fingerprint
from mmserve.media.preprocess import ImageProcessing
from mmserve.v1 import api_pb2, api_pb2_grpc, decoder_pb2_grpc, encoder_pb2_grpc, llm_pb2_grpc
from services.router.config import RouterConfig
from services.router.media import MediaStage
from services.router.openai_api import OpenAiServer
from services.router.replicas import ReplicaPool
from services.router.server import RouterServicer


async def run_router_process(config: RouterConfig) -> None:
    """Connects to the stage replicas and Redis and serves the public API until SIGTERM."""
    split, cap = RouterConfig.split, config.max_message_bytes
    decoders = ReplicaPool("decoder", split(config.decoder_addrs), decoder_pb2_grpc.DecoderStub, cap)
    encoders = ReplicaPool("encoder", split(config.encoder_addrs), encoder_pb2_grpc.EncoderStub, cap)
    llms = ReplicaPool("llm", split(config.llm_addrs), llm_pb2_grpc.LlmStub, cap)
    cache = EmbeddingCache.from_options(config)
    media = MediaStage(decoders=decoders, encoders=encoders, cache=cache,
                       model_id=model_fingerprint(config.model),
                       processing=ImageProcessing.from_pretrained(config.model),
                       media_root=config.media_root, max_media_bytes=config.max_media_bytes)
    service = rpc.Service(config, [api_pb2.DESCRIPTOR.services_by_name["Router"].full_name])
    api_pb2_grpc.add_RouterServicer_to_server(RouterServicer(config, media, llms), service.server)

    http = OpenAiServer(config) if config.http_port else None

    async def close() -> None:
        if http is not None:
            await http.close()
        for pool in (decoders, encoders, llms):
            await pool.close()
        if cache is not None:
            await cache.close()

    if http is not None:
        await http.start()  # bound first, so a taken HTTP port fails start-up; connect() once gRPC is bound
    await rpc.run_until_signalled(service, on_stop=close, on_start=http.connect if http is not None else None)


def main(argv: list[str] | None = None) -> None:
    config = RouterConfig.parse(argv, prog="mmserve-router")
    rpc.setup_logging(config.log_level)
    asyncio.run(run_router_process(config))


if __name__ == "__main__":
    main()
