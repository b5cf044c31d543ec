"""The `mmserve` command: tiny-model, up, generate, certs, secrets, decode."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile

from mmserve import tls


def _tiny_model(args: argparse.Namespace) -> int:
    import torch

    from mmserve.models.tiny import build_family_model

    try:
        dtype = getattr(torch, args.dtype) if args.dtype else None
        print(build_family_model(args.family, args.out, seed=args.seed, preset=args.preset, dtype=dtype,
                                 show_progress=True))
    except (ValueError, OSError) as err:
        print(f"mmserve tiny-model: {err}", file=sys.stderr)
        return 2
    return 0


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def model_error(model: str) -> str | None:
    """Why --model names no checkpoint: neither a directory with a config.json nor a hub id (org/name)."""
    path = pathlib.Path(model)
    if (path / "config.json").is_file():
        return None
    if path.is_dir():
        return f"--model {model}: the directory has no config.json (not a Hugging Face checkpoint)"
    if path.exists():
        return f"--model {model}: not a directory"
    if _HUB_ID.fullmatch(model):
        return None  # a hub id such as Qwen/Qwen2.5-VL-3B-Instruct, resolved by transformers
    return f"--model {model}: no such directory, and not a hub id like Qwen/Qwen2.5-VL-3B-Instruct"


def _up(args: argparse.Namespace) -> int:
    from stack.launcher import StackSpec, main_up

    if (error := model_error(args.model)) is not None:
        print(f"mmserve up: {error}", file=sys.stderr)
        return 2
    spec = StackSpec(model=args.model, host=args.host, port=args.port, redis_url=args.redis_url,
                     media_root=args.media_root, log_level=args.log_level,
                     num_encoders=args.encoder_replicas, metrics=args.metrics, http_port=args.http_port,
                     tls_dir=args.tls_dir, api_tokens_file=args.api_tokens_file,
                     router_args=tuple(shlex.split(args.router_flags)), unified=args.unified)
    if args.unified and (args.aggregated or args.encoder_replicas != 1):
        print("mmserve up: --unified runs one unified replica (encoder and llm in one process); it takes neither "
              "--aggregated nor --encoder-replicas", file=sys.stderr)
        return 2
    # The stack's generated secrets (internal token, Redis password) live as long as the stack, in a 0700 directory.
    with tempfile.TemporaryDirectory(prefix="mmserve-up-") as secrets_dir:
        spec = dataclasses.replace(spec, secrets_dir=secrets_dir)
        if args.aggregated:
            from stack.aggregated import main_aggregated

            return main_aggregated(spec)
        return main_up(spec)


def _secrets(args: argparse.Namespace) -> int:
    from stack.secrets import write_secrets

    try:
        paths = write_secrets(args.out)
    except FileExistsError as err:  # never overwrite a stack's secrets: its services and Redis hold the old ones
        print(f"mmserve secrets: {err.filename} exists; remove it to generate new secrets", file=sys.stderr)
        return 1
    print("\n".join(paths.values()))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from mmserve import auth
    from mmserve.client import build_request, run_generate

    try:
        client_tls, token = tls.client_tls_from_args(args), auth.client_token(args.token_file)
    except ValueError as err:
        print(f"mmserve generate: {err}", file=sys.stderr)
        return 2
    try:
        request = build_request(args.prompt, args.image, args.video, max_tokens=args.max_tokens,
                                temperature=args.temperature, seed=args.seed, system=args.system,
                                logprobs=args.logprobs is not None, top_logprobs=args.logprobs or 0,
                                fps=args.fps, max_frames=args.max_frames, min_pixels=args.min_pixels,
                                max_pixels=args.max_pixels)
    except OSError as err:
        print(f"mmserve generate: {err}", file=sys.stderr)
        return 2
    return run_generate(args.addr, request, args.timeout, 256 * 1024 * 1024, client_tls, token)


def _certs(args: argparse.Namespace) -> int:
    try:
        print(tls.make_dev_certs(args.out, tuple(args.name) or ("localhost", "127.0.0.1"), days=args.days))
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"mmserve certs: {err}", file=sys.stderr)
        return 2
    return 0


def _decode(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from mmserve.media.preprocess import MediaError
    from services.decoder.config import DecoderConfig
    from services.decoder.engine import VideoOptions
    from services.decoder.oneshot import LocalDecoder

    async def run():
        async with LocalDecoder(DecoderConfig(num_workers=args.workers, log_level="WARNING")) as decoder:
            return await decoder.decode(args.file, VideoOptions(fps=args.fps, max_frames=args.max_frames))

    try:
        report = asyncio.run(run())
    except (MediaError, OSError) as err:
        print(f"mmserve decode: {err}", file=sys.stderr)
        return 2
    summary = report.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['file']}: {summary['frames']} frames of {summary['width']}x{summary['height']} in "
              f"{summary['num_chunks']} chunks {summary['chunk_frames']}, decode_ms={summary['decode_ms']:.1f} "
              f"(first chunk {summary['first_chunk_ms']:.1f} ms)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmserve", description="Disaggregated serving for multimodal LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-model", help="write a tiny random-weight checkpoint (Qwen2.5-VL, Qwen3-VL or InternVL)",
                       description="Write a random-weight checkpoint of --family in its Hugging Face layout "
                                   "(config, safetensors weights, tokenizer, processor), offline; prints its path.")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--seed", type=int, default=0, help="weight seed")
    p.add_argument("--preset", default="tiny", help="tiny (float32, for tests), tiny-real-vocab, small (the SLO "
                                                    "benchmarks' model) or qwen2.5-vl-3b-width (real widths, 2 text "
                                                    "layers); the last two are saved in bfloat16 like real checkpoints")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="weights' dtype (default: the preset's)")
    p.add_argument("--family", choices=("qwen2_5_vl", "qwen3_vl", "internvl"), default="qwen2_5_vl",
                   help="model family; qwen3_vl presets: tiny, qwen3-vl-2b-width; internvl: tiny, tiny-qwen3 (an "
                        "InternVL3.5-style Qwen3 text model), internvl3-1b-width")
    p.set_defaults(func=_tiny_model)

    p = sub.add_parser("up", help="start decoder, encoder, llm and router (and redis) on loopback",
                       description="Start the decoder, encoder, llm and router as separate processes (and a private "
                                   "redis-server unless --redis-url is given); prints the router address once all "
                                   "are healthy, restarts any that exits (backoff 0.5 s doubling to 10 s; more "
                                   "than 5 restarts of one within 120 s is a crash loop that stops the stack) and "
                                   "stops them all on Ctrl-C or SIGTERM.")
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--port", type=int, default=50051, help="router port")
    p.add_argument("--host", default="127.0.0.1", help="address every service binds")
    p.add_argument("--redis-url", default="", help="use this Redis instead of starting a private one")
    p.add_argument("--media-root", default="", help="directory file:// URIs may read from")
    p.add_argument("--log-level", default="INFO", help="logging level of every service (DEBUG, INFO, WARNING)")
    p.add_argument("--encoder-replicas", type=int, default=1, help="encoder processes; a video's chunks spread over them")
    p.add_argument("--metrics", action="store_true", help="give every service a Prometheus endpoint (logged), and "
                                                          "the launcher one with mmserve_child_restarts_total{child}")
    p.add_argument("--http-port", type=int, default=0, help="OpenAI-compatible HTTP API on this port (0: off)")
    p.add_argument("--tls-dir", default="", help="TLS on the router's ports and mutual TLS between the services, "
                                                 "from ca.pem, server.pem/.key, client.pem/.key in this directory")
    p.add_argument("--api-tokens-file", default="", help="bearer tokens the public API requires, one per line "
                                                         "(or MMSERVE_API_TOKENS=a,b in the environment)")
    p.add_argument("--router-flags", default="", help="further flags for the router, e.g. \"--slo-ttft-ms-text 500 "
                   "--max-vision-tokens 8192\" (python -m services.router --help lists them)")
    p.add_argument("--aggregated", action="store_true",
                   help="run all four stages in this one process (one event loop) instead of four processes")
    p.add_argument("--unified", action="store_true",
                   help="run the encoder and the llm as one unified replica sharing the device (python -m "
                        "stack.unified: decode steps first, the encoder in the slack between them)")
    p.set_defaults(func=_up)

    p = sub.add_parser("generate", help="send a prompt with media and stream the answer",
                       description="Send one chat turn (text plus images and videos) to a running router and stream "
                                   "the answer to stdout, then the token counts and timings.")
    p.add_argument("--addr", default="127.0.0.1:50051", help="router address")
    p.add_argument("--prompt", required=True, help="the user's text")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--image", action="append", default=[], help="image file or URL (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video file or URL (repeatable)")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (with --temperature above 0)")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="print each token's log-probability and the N most likely at each step (0: none)")
    p.add_argument("--fps", type=float, default=None, help="video sampling rate (default 2)")
    p.add_argument("--max-frames", type=int, default=None, help="most frames sampled per video")
    p.add_argument("--min-pixels", type=int, default=None, help="per-frame pixel floor for videos")
    p.add_argument("--max-pixels", type=int, default=None, help="per-frame pixel cap for videos")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds the whole answer may take")
    p.add_argument("--token-file", default="", help="file holding the bearer token to send (default: "
                                                    "$MMSERVE_API_TOKEN)")
    tls.add_client_arguments(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("certs", help="write a development CA and server and client certificates",
                       description="Write a private CA (ca.pem; its key is discarded) and a server and a client "
                                   "certificate signed by it (server.pem/.key, client.pem/.key), the layout "
                                   "`mmserve up --tls-dir` reads; for development and tests, with the openssl CLI.")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--name", action="append", default=[], help="DNS name or IP address the certificates are valid "
                                                               "for (repeatable; default: localhost and 127.0.0.1)")
    p.add_argument("--days", type=int, default=825, help="validity in days")
    p.set_defaults(func=_certs)

    p = sub.add_parser("secrets", help="write a stack's internal token and Redis password (compose, k8s)",
                       description="Write a fresh internal token (internal-token), Redis password (redis-password) and "
                                   "a redis-server config file holding it (redis.conf), mode 0600, the secrets "
                                   "`mmserve up` generates per stack; compose.yaml and deploy/k8s read this layout.")
    p.add_argument("--out", required=True, help="directory to write (created 0700; existing secrets are kept)")
    p.set_defaults(func=_secrets)

    p = sub.add_parser("decode", help="decode one video or image with the decoder's own code path",
                       description="Decode one local video or image in this process with the decoder service's code "
                                   "(plan, parallel GOP chunks, resize) and report frames, chunks and decode time.")
    p.add_argument("file", help="video (mp4, mov, mkv, webm) or image (jpg, png, webp, gif) file")
    p.add_argument("--fps", type=float, default=2.0, help="video sampling rate")
    p.add_argument("--max-frames", type=int, default=768, help="most frames to sample")
    p.add_argument("--workers", type=int, default=0, help="decoder worker processes (0: one per core)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_decode)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
