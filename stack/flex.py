"""`python -m stack.flex`: a flex replica, the vision tower and the language model in one process.

It serves the Encoder and the Llm services on two ports at once; the router (`--flex-addrs`) keeps it in one
of its two stage pools at a time and moves it to whichever stage backs up (EPD role switching). Both models
stay loaded, so a move costs no load time: the price is the memory of the model the other role uses.

    python -m stack.flex --encoder-args "--model M --port 5101" --llm-args "--model M --port 5102"
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal

from mmserve import registry, rpc
from mmserve.roles import Role


def parse(argv: list[str] | None = None):
    """The encoder's and the llm's configs, each parsed from its own flags."""
    from services.encoder.config import EncoderConfig
    from services.llm.config import LlmConfig

    parser = argparse.ArgumentParser(prog="mmserve-flex", description=__doc__.splitlines()[0])
    parser.add_argument("--encoder-args", required=True, help="the encoder's flags (python -m services.encoder --help)")
    parser.add_argument("--llm-args", required=True, help="the llm's flags (python -m services.llm --help)")
    args = parser.parse_args(argv)
    return (EncoderConfig.parse(shlex.split(args.encoder_args), prog="mmserve-flex --encoder-args"),
            LlmConfig.parse(shlex.split(args.llm_args), prog="mmserve-flex --llm-args"))


async def run_flex(encoder_config, llm_config, arbiter=None, *, pair_stage: str | None = None) -> None:
    """Serves both roles until SIGTERM or SIGINT (the llm last up and first down: its health means both); a unified
    replica (stack.unified) passes the arbiter both roles take turns through. With pair_stage the two roles
    register once, as a pair: the llm (with its --registry-url) as `<pair_stage>` at `<encoder>/<llm>` addresses,
    which the router's registry reader takes into both pools together; the encoder alone registers nothing."""
    from services.encoder.__main__ import build_encoder
    from services.llm.__main__ import build_llm

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    roles: list[Role] = []
    try:
        for build, config in ((build_encoder, encoder_config), (build_llm, llm_config)):
            roles.append(role := await build(config, arbiter))
            if pair_stage is not None and len(roles) == 1:
                role.service.registry_stage = None  # the encoder: registered with the llm, as the pair
            elif pair_stage is not None:  # the llm, once the encoder serves (its port is known)
                encoder = roles[0].service
                role.service.registry_stage = pair_stage
                role.service.registry_prefix = registry.advertised_address(
                    encoder.config.host, encoder.port, encoder.config.advertise_address) + "/"
            await role.start()
        await stop.wait()
    finally:
        for role in reversed(roles):
            await role.stop()


def main(argv: list[str] | None = None) -> None:
    encoder_config, llm_config = parse(argv)
    rpc.setup_logging(llm_config.log_level)
    asyncio.run(run_flex(encoder_config, llm_config))


if __name__ == "__main__":
    main()
