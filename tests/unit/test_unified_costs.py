"""The router prices a unified replica's two roles with each other's load: selection and admission see it."""

from __future__ import annotations

import asyncio

import pytest

from services.router.config import RouterConfig
from services.router.costs import CostSeeds
from services.router.pools import build_pools, unified_pairs
from services.router.selection import Selector


def _config(**overrides) -> RouterConfig:
    return RouterConfig(**{"model": "/models/tiny", "decoder_addrs": "127.0.0.1:1", "encoder_addrs": "127.0.0.1:2",
                           "llm_addrs": "127.0.0.1:3", "unified_addrs": "127.0.0.1:4/127.0.0.1:5",
                           "unified_decode_slowdown": 1.25, "warmup": False} | overrides)


def _with_pools(config: RouterConfig, check) -> None:
    async def main():
        pools = build_pools(config, CostSeeds(encode_ms=10.0, encode_ms_per_token=0.0, step_ms=4.0,
                                              step_ms_per_seq=0.0, prefill_ms=20.0, prefill_ms_per_token=0.0))
        try:
            check(pools)
        finally:
            for pool in pools:
                await pool.close()

    asyncio.run(main())


def test_a_unified_replica_is_in_both_pools():
    def check(pools):
        assert set(pools.encoders.replicas) == {"127.0.0.1:2", "127.0.0.1:4"}
        assert set(pools.llms.replicas) == {"127.0.0.1:3", "127.0.0.1:5"}
        assert all(r.enabled for pool in pools for r in pool.replicas.values())

    _with_pools(_config(), check)


def test_each_role_is_priced_with_the_other_roles_load():
    def check(pools):
        encoder, llm = pools.encoders.replicas["127.0.0.1:4"], pools.llms.replicas["127.0.0.1:5"]
        plain_encoder, plain_llm = pools.encoders.replicas["127.0.0.1:2"], pools.llms.replicas["127.0.0.1:3"]
        assert encoder.costs.predict(100) == plain_encoder.costs.predict(100) == 10.0
        assert llm.costs.step.predict(1) == 4.0 and llm.costs.prefill.predict(50) == 20.0
        llm.num_in_flight = 3  # decodes running there: the encoder gets 1 - 1/1.25 of the device
        assert encoder.costs.predict(100) == pytest.approx(50.0)
        assert plain_encoder.costs.predict(100) == 10.0
        encoder.num_in_flight = 1  # and an encode there slows its decode steps and its prefill
        assert llm.costs.step.predict(1) == pytest.approx(5.0)
        assert llm.costs.prefill.predict(50) == pytest.approx(40.0)
        assert plain_llm.costs.step.predict(1) == 4.0
        # What a replica reports while shared is its cost alone times the load then: the model learns the cost alone.
        for _ in range(50):
            encoder.costs.observe(100, 5 * 30.0)
        encoder_alone = encoder.costs.inner.predict(100)
        assert encoder_alone == pytest.approx(30.0, rel=0.05)

    _with_pools(_config(), check)


def test_selection_sends_encodes_away_from_a_replica_busy_decoding():
    def check(pools):
        pools.llms.replicas["127.0.0.1:5"].num_in_flight = 2
        for replica in pools.encoders.replicas.values():
            replica.healthy = True
        selector = Selector(rng=__import__("random").Random(0))
        chosen = {selector.choose(pools.encoders.replicas.values(), lambda r: r.costs.predict(100)).address
                  for _ in range(20)}
        assert chosen == {"127.0.0.1:2"}
        pools.llms.replicas["127.0.0.1:5"].num_in_flight = 0
        chosen = {selector.choose(pools.encoders.replicas.values(), lambda r: r.costs.predict(100)).address
                  for _ in range(40)}
        assert chosen == {"127.0.0.1:2", "127.0.0.1:4"}

    _with_pools(_config(), check)


def test_unified_replicas_alone_need_no_separate_encoder_or_llm():
    config = _config(encoder_addrs="", llm_addrs="")
    assert config.unified_pairs() == [("127.0.0.1:4", "127.0.0.1:5")]
    with pytest.raises(ValueError, match="unified_addrs"):
        _config(unified_addrs="127.0.0.1:4")
    with pytest.raises(ValueError, match="unified_decode_slowdown"):
        _config(unified_decode_slowdown=1.0)


def test_the_registry_lists_a_unified_replica_as_one_pair():
    assert unified_pairs(["10.0.0.1:5101/10.0.0.1:5102", "10.0.0.2:5101", "a:1/", "/b:2", "a:1/b:2/c:3"]) == [
        ("10.0.0.1:5101", "10.0.0.1:5102")]


def test_a_pair_is_priced_together_once_however_often_it_is_listed():
    def check(pools):
        pools.share("127.0.0.1:4", "127.0.0.1:5")  # the registry reader's next round lists it again
        pools.share("127.0.0.1:2", "127.0.0.1:9")  # an llm not in its pool: nothing to share
        pools.llms.replicas["127.0.0.1:5"].num_in_flight = 3
        assert pools.encoders.replicas["127.0.0.1:4"].costs.predict(100) == pytest.approx(50.0)  # not 250
        assert pools.encoders.replicas["127.0.0.1:2"].costs.predict(100) == 10.0

    _with_pools(_config(), check)
