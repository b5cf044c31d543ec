"""compose.unified.yaml runs the unified layout as `mmserve up --unified` plans it."""

from __future__ import annotations

import shlex

import pytest
import yaml

from tests.unit.compose_files import (COMPOSE_ONLY, COMPOSE_UNIFIED, PLAN_ONLY, Reset, _Loader, flag_names,
                                      load_compose, option_value, parse_command, parse_unified, planned_flags)

# The router's and the replica's shared setting, passed by compose from one variable (mmserve up keeps both at
# their equal defaults).
SLOWDOWN = {"router": {"unified_decode_slowdown"}, "unified": {"max_decode_slowdown"}}


@pytest.fixture(scope="module")
def override() -> dict:
    return load_compose(COMPOSE_UNIFIED)["services"]


def _role_args(command: list[str]) -> dict[str, list[str]]:
    return {role: shlex.split(option_value(command, f"--{role}-args")) for role in ("encoder", "llm")}


def test_the_unified_replica_replaces_the_encoder_and_the_llm(override):
    assert override["encoder"]["profiles"] == override["llm"]["profiles"] == ["split"]  # not started
    assert override["unified"]["extends"] == {"file": "compose.yaml", "service": "llm"}
    assert "profiles" not in override["unified"]
    assert isinstance(override["router"]["depends_on"], Reset)
    assert set(override["router"]["depends_on"].value) == {"redis", "decoder", "unified"}


def test_the_unified_command_parses_and_passes_what_mmserve_up_passes(override):
    command = override["unified"]["command"]
    assert command[0] == "stack.unified"  # the image's ENTRYPOINT is `python -m`
    encoder, llm, arbiter = parse_unified(command[1:])
    assert encoder.host == llm.host == "0.0.0.0" and encoder.port != llm.port
    assert encoder.metrics_port == 0 and llm.metrics_port  # one registry per process, served once
    planned = planned_flags(unified=True)
    for role, argv in _role_args(command).items():
        passed, wanted = flag_names(argv) - COMPOSE_ONLY[role], planned[role] - PLAN_ONLY[role]
        assert passed == wanted, f"{role}: compose lacks {wanted - passed}, adds {passed - wanted}"
        assert option_value(argv, "--advertise-address") == f"unified:{option_value(argv, '--port')}"
    own = [a for a, before in zip(command[1:], command) if before not in ("--encoder-args", "--llm-args")]
    assert flag_names(own) - {"encoder_args", "llm_args"} == SLOWDOWN["unified"]


def test_the_router_names_the_replica_and_passes_what_mmserve_up_passes(override):
    command = override["router"]["command"]
    router = parse_command(command)
    planned = planned_flags(unified=True)["router"]
    passed = flag_names(command) - COMPOSE_ONLY["router"] - SLOWDOWN["router"]
    assert passed == planned - PLAN_ONLY["router"], f"lacks {planned - passed}, adds {passed - planned}"
    roles = _role_args(override["unified"]["command"])
    assert router.unified_addrs == "/".join(option_value(roles[r], "--advertise-address") for r in ("encoder", "llm"))
    assert not router.encoder_addrs and not router.llm_addrs


def test_the_replica_and_the_router_take_the_slowdown_from_one_variable():
    raw = yaml.load(COMPOSE_UNIFIED.read_text(), Loader=_Loader)["services"]
    variable = option_value(raw["unified"]["command"], "--max-decode-slowdown")
    assert variable.startswith("${UNIFIED_DECODE_SLOWDOWN:-")
    assert option_value(raw["router"]["command"], "--unified-decode-slowdown") == variable
    env = {"UNIFIED_DECODE_SLOWDOWN": "1.5"}
    services = load_compose(COMPOSE_UNIFIED, env)["services"]
    assert parse_unified(services["unified"]["command"][1:])[2].max_decode_slowdown == 1.5
    assert parse_command(services["router"]["command"]).unified_decode_slowdown == 1.5


def test_the_unified_replica_reserves_one_gpu_setting_of_its_own(override):
    deploy = override["unified"]["deploy"]
    assert isinstance(deploy, Reset) and deploy.tag == "!override"  # not merged with the llm's devices
    # (a tagged value is not substituted by load_compose: the raw setting)
    assert deploy.value["resources"]["reservations"]["devices"][0]["device_ids"] == ["${UNIFIED_GPUS:-2}"]
    assert override["unified"]["healthcheck"]["test"][4] == "127.0.0.1:50063"
