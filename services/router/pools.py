"""The router's three stage pools, filled from static address lists and the Redis registry."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from mmserve import tls
from mmserve.registry import UNIFIED_STAGE, RegistryReader, redis_password
from mmserve.v1 import decoder_pb2_grpc, encoder_pb2_grpc, llm_pb2_grpc
from services.router import metrics
from services.router.config import RouterConfig
from services.router.costs import CostSeeds, DecodeCost, LlmCosts, SharedCost, SharedDevice, encode_cost
from services.router.replicas import ReplicaPool, keepalive_options

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Pools:
    decoders: ReplicaPool
    encoders: ReplicaPool
    llms: ReplicaPool
    device: SharedDevice  # how a unified replica's two roles load each other

    def __iter__(self):
        return iter((self.decoders, self.encoders, self.llms))

    def share(self, encoder: str, llm: str) -> None:
        """Prices a unified replica's two roles (both in their pools) with each other's load, once per Replica."""
        encoder_replica, llm_replica = self.encoders.replicas.get(encoder), self.llms.replicas.get(llm)
        if encoder_replica is None or llm_replica is None or isinstance(encoder_replica.costs, SharedCost):
            return  # not both in their pools, or priced together already
        self.device.share(encoder_replica, llm_replica)


def build_pools(config: RouterConfig, seeds: CostSeeds | None = None) -> Pools:
    """Pools with one cost model per replica; static addresses are added at once (used once healthy)."""
    seeds = seeds or CostSeeds()
    slo = config.policy == "slo"
    common = dict(max_message_bytes=config.max_message_bytes, policy=config.policy, client_tls=tls.client_tls(config),
                  channel_options=keepalive_options(config.replica_keepalive_ms, config.replica_keepalive_timeout_ms,
                                                    config.replica_reconnect_max_ms),
                  max_waiting=config.stage_max_waiting)
    pools = Pools(
        ReplicaPool("decoder", decoder_pb2_grpc.DecoderStub, make_costs=lambda: DecodeCost(seeds),
                    max_in_flight=config.decoder_max_in_flight if slo else 0, **common),
        ReplicaPool("encoder", encoder_pb2_grpc.EncoderStub, make_costs=lambda: encode_cost(seeds),
                    max_in_flight=config.encoder_max_in_flight if slo else 0, **common),
        # The llm batches continuously and orders its own queue by deadline: no slots, only selection.
        ReplicaPool("llm", llm_pb2_grpc.LlmStub, make_costs=lambda: LlmCosts(seeds), **common),
        SharedDevice(config.unified_decode_slowdown, config.unified_overlap_share))
    for pool, addresses in zip(pools, (config.decoder_addrs, config.encoder_addrs, config.llm_addrs)):
        for address in RouterConfig.split(addresses):
            pool.add(address)
    for encoder, llm in config.unified_pairs():  # in both pools at once, each role priced with the other's load
        pools.encoders.add(encoder)
        pools.llms.add(llm)
        pools.share(encoder, llm)
    return pools


def unified_pairs(members: list[str]) -> list[tuple[str, str]]:
    """The (encoder, llm) addresses of the unified replicas the registry lists as `<encoder>/<llm>`."""
    return [pair for pair in map(RouterConfig.pair, members) if pair is not None]


async def follow_registry(config: RouterConfig, pools: Pools) -> None:
    """Keeps each pool equal to its static addresses plus the replicas alive in the registry (a unified replica's
    entry puts its two roles in both pools, priced together)."""
    reader = RegistryReader(config.registry_url, redis_password(config))
    static = {pool.stage: RouterConfig.split(a)
              for pool, a in zip(pools, (config.decoder_addrs, config.encoder_addrs, config.llm_addrs))}
    for encoder, llm in config.flex_pairs() + config.unified_pairs():  # flex and unified replicas: in both pools
        static["encoder"].append(encoder)
        static["llm"].append(llm)
    pairs: list[tuple[str, str]] = []
    try:
        while True:
            if (members := await reader.members(UNIFIED_STAGE)) is not None:
                pairs = unified_pairs(members)
            paired = {"encoder": {encoder for encoder, _ in pairs}, "llm": {llm for _, llm in pairs}}
            for pool in pools:
                members = await reader.members(pool.stage)
                if members is not None:  # registry unreadable: keep the last view
                    pool.set_addresses(sorted(set(static[pool.stage]) | set(members) | paired.get(pool.stage, set())))
            for encoder, llm in pairs:
                pools.share(encoder, llm)
            await asyncio.sleep(config.registry_refresh_s)
    finally:
        await reader.close()


def export_gauges(pools: Pools) -> None:
    """Healthy replicas and waiting calls per stage, read from the pools whenever metrics are scraped."""
    for pool in pools:
        metrics.HEALTHY.labels(pool.stage).set_function(lambda pool=pool: len(pool.healthy()))
        metrics.WAITING.labels(pool.stage).set_function(lambda pool=pool: pool.num_waiting)
