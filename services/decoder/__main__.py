"""`python -m services.decoder`: runs the decoder service."""

from __future__ import annotations

import asyncio

from mmserve import rpc
from mmserve.roles import Role
from mmserve.v1 import decoder_pb2, decoder_pb2_grpc
from services.decoder.config import DecoderConfig
from services.decoder.engine import DecodeEngine
from services.decoder.server import DecoderServicer


async def build_decoder(config: DecoderConfig) -> Role:
    """Starts the worker pool and builds the decoder's server (not yet serving)."""
    engine = DecodeEngine(config)
    await engine.start()
    service = rpc.Service(config, [decoder_pb2.DESCRIPTOR.services_by_name["Decoder"].full_name])
    servicer = DecoderServicer(config, engine)
    decoder_pb2_grpc.add_DecoderServicer_to_server(servicer, service.server)

    async def stop() -> None:
        servicer.close()
        await engine.close()

    return Role(service, on_stop=stop)


async def run_decoder_process(config: DecoderConfig) -> None:
    """Starts the worker pool, then serves decode requests until SIGTERM."""
    await (await build_decoder(config)).run_until_signalled()


def main(argv: list[str] | None = None) -> None:
    config = DecoderConfig.parse(argv, prog="mmserve-decoder")
    rpc.setup_logging(config.log_level)
    rpc.lower_priority(config.nice)
    asyncio.run(run_decoder_process(config))


if __name__ == "__main__":
    main()
