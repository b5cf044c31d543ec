"""compose.yaml, compose.cpu.yaml and .env.example agree with the service configs and `mmserve up`."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest
import yaml

from services.router.config import RouterConfig
from stack.launcher import StackSpec, plan
from stack.secrets import SECRET_FILES
from tests.unit.compose_files import (COMPOSE, COMPOSE_CPU, COMPOSE_ONLY, COMPOSE_UNIFIED, CONFIGS, GPU_SERVICES, PLAN_ONLY, ROOT,
                                      TLS_ENV, TLS_MOUNT, TOKENS_FILE, UNSET_VOLUME, Reset, _Loader, env_example,
                                      flag_names, interpolate, load_compose, mmserve_services, option_value,
                                      parse_command, planned, planned_flags, probe_tls, switches, tls_values,
                                      variables)


# --- compose.yaml ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


def test_the_five_services_from_one_image(compose):
    assert set(compose["services"]) == {"redis", "decoder", "encoder", "llm", "router"}
    services = mmserve_services(compose)
    assert len({s["image"] for s in services.values()}) == 1
    builds = [s["build"] for s in services.values()]
    assert all(b == builds[0] for b in builds) and builds[0]["args"]["VARIANT"] in ("cpu", "cuda")
    assert (ROOT / builds[0]["context"] / "Dockerfile").is_file()
    for name, service in services.items():
        assert service["command"][0] == f"services.{name}"  # the image's ENTRYPOINT is `python -m`


def test_commands_are_real_flags_of_each_config(compose):
    for name, service in mmserve_services(compose).items():
        config = parse_command(service["command"])
        assert type(config) is CONFIGS[name]
        assert config.host == "0.0.0.0", f"{name}: bind every interface inside the container"


def test_compose_passes_the_flags_mmserve_up_passes(compose):
    planned = planned_flags()
    for name, service in mmserve_services(compose).items():
        passed, wanted = flag_names(service["command"]) - COMPOSE_ONLY[name], planned[name] - PLAN_ONLY[name]
        assert passed == wanted, f"{name}: compose lacks {wanted - passed}, adds {passed - wanted}"


def test_router_ports_are_passed_and_only_they_are_published(compose):
    router = compose["services"]["router"]
    published = {p.split(":")[-1] for p in router["ports"]}
    # Every port field of the router (gRPC, and any other listener such as an HTTP front end) except metrics.
    for field in dataclasses.fields(RouterConfig):
        if (field.name == "port" or field.name.endswith("_port")) and field.name != "metrics_port":
            flag = "--" + field.name.replace("_", "-")
            assert flag in router["command"], f"router: pass {flag}"
            assert option_value(router["command"], flag) in published, f"router: publish {flag}"
    for name, service in compose["services"].items():
        assert name == "router" or "ports" not in service, f"{name}: only the router is published"


def test_gpus_are_reserved_per_service(compose):
    for name in GPU_SERVICES:
        devices = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert [d["driver"] for d in devices] == ["nvidia"], name
        assert "gpu" in devices[0]["capabilities"]
        ids = ",".join(devices[0]["device_ids"]).split(",")
        assert all(i.strip().isdigit() for i in ids), f"{name}: device ids {ids}"
    decoder = compose["services"]["decoder"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert len(",".join(decoder["device_ids"]).split(",")) >= 2, "the decoder fans out over several GPUs"
    assert "deploy" not in compose["services"]["router"]
    raw = yaml.load(COMPOSE.read_text(), Loader=_Loader)["services"]
    for name in GPU_SERVICES:  # which GPUs is a setting
        for device_id in raw[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]:
            assert re.fullmatch(r"\$\{\w+_GPUS:-[\d,]+\}", device_id), device_id


def test_shared_ipc_and_pid_namespaces_and_shm(compose):
    for name, service in mmserve_services(compose).items():
        assert service["ipc"] == "host" and service["pid"] == "host", name
        assert re.fullmatch(r"\d+[kmg]?b?", service["shm_size"]), service["shm_size"]


def test_healthchecks_probe_each_service_port(compose):
    for name, service in mmserve_services(compose).items():
        port = option_value(service["command"], "--port")
        assert service["healthcheck"]["test"][:5] == ["CMD", "python", "-m", "mmserve.probe", f"127.0.0.1:{port}"]
        assert service["healthcheck"]["start_period"]  # model loading is not a failure
    assert "redis-cli" in compose["services"]["redis"]["healthcheck"]["test"]
    assert "ping" in compose["services"]["redis"]["healthcheck"]["test"]


def test_start_order_waits_for_health(compose):
    services = compose["services"]
    assert services["router"]["depends_on"] == {name: {"condition": "service_healthy"}
                                                for name in ("redis", "decoder", "encoder", "llm")}
    assert services["encoder"]["depends_on"] == {"redis": {"condition": "service_healthy"}}
    for name, service in mmserve_services(compose).items():
        for dependency in service.get("depends_on", {}):
            assert "healthcheck" in services[dependency], dependency


def test_redis_is_bounded_and_evicts_lru(compose):
    command = compose["services"]["redis"]["command"]
    assert option_value(command, "--maxmemory-policy") == "allkeys-lru"
    assert re.fullmatch(r"\d+[kmg]b", option_value(command, "--maxmemory"))
    raw = yaml.load(COMPOSE.read_text(), Loader=_Loader)["services"]["redis"]["command"]
    assert option_value(raw, "--maxmemory").startswith("${REDIS_MAXMEMORY:-")
    for name, service in mmserve_services(compose).items():
        argv = service["command"]
        if "--redis-url" in argv:
            assert option_value(argv, "--redis-url") == "redis://redis:6379/0", name


def test_every_service_registers_under_its_compose_name(compose):
    raw = {name: service["command"] for name, service in mmserve_services(yaml.load(COMPOSE.read_text(),
                                                                                   Loader=_Loader)).items()}
    assert {option_value(argv, "--registry-url") for argv in raw.values()} == {"${REGISTRY_URL:-redis://redis:6379/0}"}
    for name, service in mmserve_services(compose).items():
        argv = service["command"]
        # Reachable on the compose network: the service name and the port it binds.
        assert option_value(argv, "--advertise-address") == f"{name}:{option_value(argv, '--port')}", name
    router = compose["services"]["router"]["command"]
    for stage in GPU_SERVICES:  # the static lists stay: the same names, so the registry adds no duplicate
        advertised = option_value(compose["services"][stage]["command"], "--advertise-address")
        assert option_value(router, f"--{stage}-addrs") == advertised, stage
    registry = load_compose(env={"REGISTRY_URL": "redis://registry:6379/2"})["services"]
    assert all(option_value(s["command"], "--registry-url") == "redis://registry:6379/2"
               for s in mmserve_services({"services": registry}).values())


def test_env_file_is_ignored_by_git():
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def test_secrets_come_from_compose_secrets_and_never_from_a_command_line(compose):
    files = {name: secret["file"] for name, secret in compose["secrets"].items()}
    assert files == {"internal_token": "./secrets/internal-token", "redis_password": "./secrets/redis-password",
                     "redis_conf": "./secrets/redis.conf"}  # the layout `mmserve secrets --out ./secrets` writes
    assert set(SECRET_FILES) == {pathlib.Path(f).name for f in files.values()}
    assert "secrets/" in (ROOT / ".gitignore").read_text().splitlines()
    for name, service in mmserve_services(compose).items():
        assert set(service["secrets"]) == {"internal_token", "redis_password"}, name
        config = parse_command(service["command"])
        assert config.internal_token_file == "/run/secrets/internal_token", name  # stages on 0.0.0.0 need it
        assert config.redis_password_file == "/run/secrets/redis_password", name
    redis = compose["services"]["redis"]
    assert redis["command"][:2] == ["redis-server", "/run/secrets/redis_conf"] and "redis_conf" in redis["secrets"]
    assert "--requirepass" not in redis["command"] and "redis_password" in redis["healthcheck"]["test"][3]


def test_model_and_media_are_mounted_read_only(compose):
    for name, service in mmserve_services(compose).items():
        mounts = {volume.split(":")[1]: volume.split(":")[2:] for volume in service["volumes"]}
        assert mounts["/model"] == ["ro"] and mounts["/media"] == ["ro"], name
        argv = service["command"]
        if "--model" in argv:
            assert option_value(argv, "--model") == "/model", name
        if "--media-root" in argv:
            assert option_value(argv, "--media-root") == "/media", name


def test_every_variable_has_one_default_documented_in_env_example():
    documented = env_example()
    used: dict[str, set[str | None]] = {}
    for path in (COMPOSE, COMPOSE_CPU, COMPOSE_UNIFIED):
        for name, defaults in variables(path).items():
            used.setdefault(name, set()).update(defaults)
    switched = switches(COMPOSE) | switches(COMPOSE_CPU) | switches(COMPOSE_UNIFIED)
    assert switched == set(TLS_ENV)
    for name, defaults in sorted(used.items()):
        if name in switched:  # off by default; its one fallback is the empty volume mounted in its place
            assert documented.get(name) == "", f".env.example: {name}= (empty: off)"
            assert defaults == {UNSET_VOLUME}, f"${{{name}}}: only a mount falls back (to {UNSET_VOLUME}), {defaults}"
            continue
        assert None not in defaults, f"${{{name}}} needs a default (${{{name}:-...}})"
        assert len(defaults) == 1, f"${{{name}}} has different defaults: {defaults}"
        assert name in documented, f"{name} is not documented in .env.example"
        assert documented[name] == next(iter(defaults)), f".env.example: {name} differs from the compose default"
    assert set(documented) == set(used), f".env.example documents unused {set(documented) - set(used)}"


def test_tls_and_tokens_are_off_by_default(compose):
    for name, service in mmserve_services(compose).items():
        assert set(tls_values(parse_command(service["command"])).values()) == {""}, f"{name}: plaintext, open"
        assert probe_tls(service["healthcheck"]["test"]) is None, f"{name}: a plaintext probe"


def test_tls_dir_and_tokens_file_configure_what_mmserve_up_plans():
    services = mmserve_services(load_compose(env=TLS_ENV))
    for name, (wanted, child) in planned().items():
        config = parse_command(services[name]["command"])
        assert tls_values(config) == tls_values(wanted), name
        # The probe presents the client certificate `mmserve up` checks health with, and asks for the name others
        # reach the service by (its certificate need not name 127.0.0.1).
        host = config.advertise_address.rsplit(":", 1)[0]
        assert host == name
        assert probe_tls(services[name]["healthcheck"]["test"]) == dataclasses.replace(child.client_tls,
                                                                                       server_name=host), name
    assert planned()["router"][0].api_tokens_file == TOKENS_FILE


def test_certificates_and_tokens_are_mounted_read_only():
    def mounts(compose: dict) -> dict[str, dict[str, str]]:
        return {name: {target: f"{source}:{mode}" for source, target, mode in (v.split(":") for v in s["volumes"])}
                for name, s in mmserve_services(compose).items()}

    on, off = mounts(load_compose(env=TLS_ENV)), mounts(load_compose())
    for name in CONFIGS:
        assert on[name][TLS_MOUNT] == f"{TLS_ENV['TLS_DIR']}:ro", name
        assert off[name][TLS_MOUNT] == f"{UNSET_VOLUME}:ro", name
        tokens = on[name].get(TOKENS_FILE)
        assert tokens == (f"{TLS_ENV['API_TOKENS_FILE']}:ro" if name == "router" else None), f"{name}: {tokens}"
    assert off["router"][TOKENS_FILE] == f"{UNSET_VOLUME}:ro"
    assert load_compose()["volumes"] == {UNSET_VOLUME: {}}  # declared: without TLS_DIR it is what /tls mounts


def test_env_values_reach_the_commands():
    compose = load_compose(env={"DECODER_PORT": "6001", "LLM_GPUS": "5", "REDIS_MAXMEMORY": "1gb"})
    services = compose["services"]
    assert option_value(services["decoder"]["command"], "--port") == "6001"
    assert option_value(services["router"]["command"], "--decoder-addrs") == "decoder:6001"
    assert services["decoder"]["healthcheck"]["test"][4] == "127.0.0.1:6001"
    assert services["llm"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["5"]
    assert option_value(services["redis"]["command"], "--maxmemory") == "1gb"


def test_cpu_override_drops_gpu_reservations_and_builds_cpu():
    override = load_compose(COMPOSE_CPU)["services"]
    base = load_compose()["services"]
    assert set(override) <= set(base)
    for name in CONFIGS:
        assert override[name]["build"]["args"]["VARIANT"] == "cpu"
        assert override[name]["image"] != base[name]["image"]  # the CPU build does not overwrite the CUDA tag
    for name in GPU_SERVICES:
        assert isinstance(override[name]["deploy"], Reset) and override[name]["deploy"].tag == "!reset"
    assert not any("command" in s for s in override.values()), "commands live in compose.yaml only"


def test_interpolation_follows_compose():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${UNSET:-d} ${EMPTY-d} ${UNSET-d} $$HOME", env) == "x d d  d $HOME"
    assert interpolate("${SET:+on}|${EMPTY:+on}|${UNSET:+on}|${EMPTY+on}|${UNSET+on}", env) == "on|||on|"
    with pytest.raises(KeyError):
        interpolate("${UNSET:?required}", env)


def test_plan_gives_each_stage_its_config_and_the_router_its_further_flags():
    planned = plan(StackSpec(model="/m", redis_url="redis://127.0.0.1:1/0", num_encoders=2,
                             router_args=("--policy", "fcfs")))
    assert [stage for stage, _ in planned.services] == ["decoder", "encoder", "encoder", "llm", "router"]
    assert planned.redis_argv is None  # the spec names a Redis: no private redis-server
    stage, router = planned.services[-1]
    assert router.policy == "fcfs" and router.model == "/m"
    children = planned.children()
    assert [c.name for c in children] == ["decoder", "encoder-0", "encoder-1", "llm", "router"]
    assert RouterConfig.parse(children[-1].argv[3:]) == router  # the process gets exactly the planned config


def test_up_unified_runs_the_encoder_and_the_llm_as_one_unified_replica():
    planned = plan(StackSpec(model="/m", redis_url="redis://127.0.0.1:1/0", unified=True))
    configs = dict(planned.services)
    router = configs["router"]
    encoder, llm = configs["encoder"], configs["llm"]
    assert router.unified_pairs() == [(f"{encoder.host}:{encoder.port}", f"{llm.host}:{llm.port}")]
    assert not router.encoder_addrs and not router.llm_addrs
    children = planned.children()
    assert [c.name for c in children] == ["decoder", "unified", "router"]
    from stack.unified import parse

    assert parse(children[1].argv[3:])[:2] == (encoder, llm)  # one process, exactly the planned configs


def test_router_keys_the_cache_with_the_encoders_dtype():
    """The router's --encoder-dtype is the encoders' --dtype (one DTYPE), so a bfloat16 fleet's entries are keyed as
    bfloat16 whatever a CPU on the router's host would resolve "auto" to."""
    for env in ({}, {"DTYPE": "bfloat16"}):
        services = load_compose(env=env)["services"]
        dtype = option_value(services["encoder"]["command"], "--dtype")
        assert option_value(services["router"]["command"], "--encoder-dtype") == dtype == env.get("DTYPE", "auto")
