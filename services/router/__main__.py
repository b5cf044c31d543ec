"""`python -m services.router`: runs the public router service."""

from __future__ import annotations

import asyncio
import logging
import math

from mmserve import rpc
from mmserve.cache import EmbeddingCache
from mmserve.cache_keys import encoder_id, model_fingerprint
from mmserve.media.fetch import FetchPolicy
from mmserve.models.dtypes import cpu_dtype_name
from mmserve.models.family import Family, family_of
from mmserve.roles import Role
from mmserve.v1 import api_pb2, api_pb2_grpc
from services.router.admission import Controller
from services.router.config import RouterConfig
from services.router.flex import FlexReplica, RoleSwitcher
from services.router.media import MediaStage
from services.router.openai_api import OpenAiServer
from services.router.planning import PromptBudget
from services.router.policy import Slo, SloDefaults
from services.router.rebalance import RoleBalancer
from services.router.pools import build_pools, export_gauges, follow_registry
from services.router.server import RouterServicer
from services.router.validation import RequestLimits
from services.router.warmup import warm_up

log = logging.getLogger("services.router")


def request_limits(config: RouterConfig, family: Family) -> RequestLimits:
    """The server's caps on one request, from its settings and the model's own preprocessing bounds."""
    image = family.default_params("image")
    return RequestLimits(
        max_messages=config.max_messages, max_media=config.max_media_per_request,
        max_tokens_limit=config.max_tokens_limit, max_media_bytes=config.max_media_bytes,
        max_top_logprobs=config.max_top_logprobs,
        max_frames=config.max_video_frames, min_pixels=image.min_pixels,
        max_pixels=min(image.max_pixels, config.max_item_pixels or image.max_pixels),
        max_slo_ttft_ms={"video": config.max_slo_ttft_ms or config.slo_ttft_ms_video,
                         "image": config.max_slo_ttft_ms or config.slo_ttft_ms_image,
                         "text": config.max_slo_ttft_ms or config.slo_ttft_ms_text},
        max_slo_tpot_ms=config.max_slo_tpot_ms or config.slo_tpot_ms)


async def build_router(config: RouterConfig) -> Role:
    """Connects to the stage replicas and Redis and builds the router's server (not yet serving)."""
    rpc.install_credentials(config)  # before the first channel to a replica: its calls carry the internal token
    pools = build_pools(config)
    decoders, encoders, llms = pools
    controller = Controller(decoders, encoders, llms, policy=config.policy, headroom=config.admission_headroom,
                            target=config.admission_target,
                            probe_after_s=config.admission_probe_after_s or math.inf,
                            defaults=SloDefaults(video=Slo(config.slo_ttft_ms_video, config.slo_tpot_ms),
                                                 image=Slo(config.slo_ttft_ms_image, config.slo_tpot_ms),
                                                 text=Slo(config.slo_ttft_ms_text, config.slo_tpot_ms)))
    export_gauges(pools)
    background: list[asyncio.Task] = []
    if config.flex_pairs():
        balancer = RoleBalancer(ratio=config.role_switch_ratio, min_backlog_ms=config.role_switch_min_backlog_ms,
                                sustain_s=config.role_switch_sustain_s, dwell_s=config.role_switch_dwell_s)
        switcher = RoleSwitcher(pools, lambda stage: controller.backlogs[stage].total_ms(),
                                [FlexReplica(*pair) for pair in config.flex_pairs()], balancer)
        background.append(asyncio.ensure_future(switcher.run()))
    if config.registry_url:
        background.append(asyncio.ensure_future(follow_registry(config, pools)))
    cache = EmbeddingCache.from_options(config)
    family = family_of(config.model)
    # The encoders' dtype as they resolve their own --dtype: known before any encode, so keys can carry it.
    dtype_name = cpu_dtype_name(config.encoder_dtype, config.model)
    media = MediaStage(decoders=decoders, encoders=encoders, cache=cache,
                       model_id=encoder_id(model_fingerprint(config.model), family.name, dtype_name),
                       encoder_dtype=dtype_name, family=family,
                       max_frames=config.max_video_frames, max_pixels=config.max_item_pixels,
                       chunk_frames=config.video_chunk_frames if config.stream_prefill else 0,
                       files_in_place=config.files_in_place,
                       fetch_policy=FetchPolicy(media_root=config.media_root, max_bytes=config.max_media_bytes,
                                                timeout_s=config.fetch_timeout_s,
                                                max_redirects=config.fetch_max_redirects,
                                                allow_private=config.fetch_allow_private))
    service = rpc.Service(config, [api_pb2.DESCRIPTOR.services_by_name["Router"].full_name], holds_tensors=False)
    budget = PromptBudget(config.model, family, max_model_len=config.max_model_len,
                          max_vision_tokens=config.max_vision_tokens)
    servicer = RouterServicer(config, media, llms, controller, request_limits(config, family), budget)
    api_pb2_grpc.add_RouterServicer_to_server(servicer, service.server)

    for pool in pools:  # report SERVING once every stage can take work (or after a bounded wait)
        try:
            await pool.wait_healthy(config.startup_wait_s)
        except TimeoutError:
            log.warning("no healthy %s replica yet; serving anyway", pool.stage)
    if config.warmup:
        background.append(asyncio.ensure_future(warm_up(pools, family)))
    http = OpenAiServer(config, service.add_local_port()) if config.http_port else None

    async def close() -> None:
        for task in background:
            task.cancel()
        if http is not None:
            await http.close()
        for pool in (decoders, encoders, llms):
            await pool.close()
        if cache is not None:
            await cache.close()

    if http is not None:
        await http.start()  # bound first, so a taken HTTP port fails start-up; connect() once gRPC is bound
    return Role(service, on_stop=close, on_start=http.connect if http is not None else None)


async def run_router_process(config: RouterConfig) -> None:
    """Connects to the stage replicas and Redis and serves the public API until SIGTERM."""
    await (await build_router(config)).run_until_signalled()


def main(argv: list[str] | None = None) -> None:
    config = RouterConfig.parse(argv, prog="mmserve-router")
    rpc.setup_logging(config.log_level)
    rpc.lower_priority(config.nice)
    asyncio.run(run_router_process(config))


if __name__ == "__main__":
    main()
