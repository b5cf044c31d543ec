"""`python -m stack.unified`: a unified replica, the vision tower and the language model sharing one device at once.

It serves the Encoder and the Llm services on two ports, each with its own scheduler and batcher (the encoder's
dynamic batching, the llm's continuous batching), and a DeviceArbiter between them (services/unified/arbiter.py):
the llm's decode steps come first, the encoder runs bounded slices between two steps. The router
(`--unified-addrs`) keeps it in both stage pools at once and prices each role with the other's load.

    python -m stack.unified --encoder-args "--model M --port 5101" --llm-args "--model M --port 5102"

On CPU the two roles take turns on all the cores (torch's intra-op team belongs to the calling thread, so the
tower's thread and the engine's thread each run with their own --num-threads); with --overlap-threads N a slice
runs beside the decode steps on N threads while the steps use the rest, and either role alone gets them all.
On one NVIDIA GPU (both roles' --device) the roles get CUDA streams of their own, the llm's at a higher priority
(services/unified/gpu.py), and a bounded slice runs beside each decode step.

With --registry-url in its --llm-args it registers once, as the pair (`unified`, `<encoder>/<llm>` addresses): a
router that follows the registry keeps it in both pools and prices each role with the other's load, as it does a
pair of --unified-addrs (Kubernetes: deploy/k8s/unified).
"""

from __future__ import annotations

import argparse
import asyncio
import shlex

from mmserve import rpc
from mmserve.config import add_flags
from mmserve.registry import UNIFIED_STAGE


def parse(argv: list[str] | None = None):
    """The encoder's, the llm's and the arbiter's configs."""
    from services.encoder.config import EncoderConfig
    from services.llm.config import LlmConfig
    from services.unified.config import ArbiterConfig

    parser = argparse.ArgumentParser(prog="mmserve-unified", description=__doc__.splitlines()[0])
    parser.add_argument("--encoder-args", required=True, help="the encoder's flags (python -m services.encoder --help)")
    parser.add_argument("--llm-args", required=True, help="the llm's flags (python -m services.llm --help)")
    parser.add_argument("--role-flag", action="append", default=[], metavar="FLAG",
                        help="a flag both roles get after their own (repeatable: "
                             "--role-flag=--tls-ca-file=/tls/ca.pem), as a deployment's patch adds it to the replica")
    add_flags(ArbiterConfig, parser)
    args = parser.parse_args(argv)
    arbiter = ArbiterConfig(**{name: getattr(args, name) for name in ArbiterConfig.__dataclass_fields__})
    encoder_argv = shlex.split(args.encoder_args) + args.role_flag
    llm_argv = shlex.split(args.llm_args) + args.role_flag
    return (EncoderConfig.parse(encoder_argv, prog="mmserve-unified --encoder-args"),
            LlmConfig.parse(llm_argv, prog="mmserve-unified --llm-args"), arbiter)


async def run_unified(encoder_config, llm_config, arbiter_config) -> None:
    """Serves both roles over one arbiter until SIGTERM or SIGINT."""
    import torch

    from mmserve.models.loading import resolve_device
    from services.unified.arbiter import DeviceArbiter, SliceBudget
    from services.unified.gpu import role_streams
    from stack.flex import run_flex

    # The llm's threads: its --num-threads, else what torch would give its engine thread (the process default).
    llm_threads = llm_config.num_threads or torch.get_num_threads()
    arbiter = DeviceArbiter(SliceBudget(arbiter_config), overlap_threads=arbiter_config.overlap_threads,
                            llm_threads=llm_threads, set_llm_threads=torch.set_num_threads,
                            streams=role_streams(resolve_device(encoder_config.device),
                                                 resolve_device(llm_config.device)))
    await run_flex(encoder_config, llm_config, arbiter, pair_stage=UNIFIED_STAGE)


def main(argv: list[str] | None = None) -> None:
    encoder_config, llm_config, arbiter_config = parse(argv)
    rpc.setup_logging(llm_config.log_level)
    asyncio.run(run_unified(encoder_config, llm_config, arbiter_config))


if __name__ == "__main__":
    main()
