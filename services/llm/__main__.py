"""`python -m services.llm`: runs the LLM service."""

from __future__ import annotations

import asyncio

from mmserve import rpc
from mmserve.cache import EmbeddingCache
from mmserve.roles import Role
from mmserve.v1 import llm_pb2, llm_pb2_grpc
from services.llm.config import LlmConfig
from services.llm.engine import Engine
from services.llm.server import LlmServicer


async def build_llm(config: LlmConfig, arbiter=None) -> Role:
    """Loads the language model, starts its engine thread and builds the llm's server (not yet serving); on a
    unified replica its steps take turns with the encoder's through arbiter."""
    engine = Engine(config, arbiter)
    engine.start()
    service = rpc.Service(config, [llm_pb2.DESCRIPTOR.services_by_name["Llm"].full_name])
    cache = EmbeddingCache.from_options(config)
    llm_pb2_grpc.add_LlmServicer_to_server(LlmServicer(engine, cache), service.server)

    async def stop() -> None:
        try:
            await asyncio.to_thread(engine.stop)
        finally:
            if cache is not None:
                await cache.close()

    return Role(service, on_stop=stop)


async def run_llm_process(config: LlmConfig) -> None:
    """Loads the language model and serves until SIGTERM."""
    await (await build_llm(config)).run_until_signalled()


def main(argv: list[str] | None = None) -> None:
    config = LlmConfig.parse(argv, prog="mmserve-llm")
    rpc.setup_logging(config.log_level)
    rpc.lower_priority(config.nice)
    asyncio.run(run_llm_process(config))


if __name__ == "__main__":
    main()
