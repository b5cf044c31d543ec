"""compose.yaml, compose.cpu.yaml and .env.example agree with the service configs and `mmserve up` (helpers for
tests/unit/test_k8s.py and tests/integration/test_compose_stack.py too)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import pathlib
import re
import tempfile
from collections.abc import Mapping

import pytest
import yaml

from mmserve import probe, tls
from mmserve.config import ServiceConfig
from stack.launcher import Child, StackSpec, plan
from stack.secrets import SECRET_FILES
from services.decoder.config import DecoderConfig
from services.encoder.config import EncoderConfig
from services.llm.config import LlmConfig
from services.router.config import RouterConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE, COMPOSE_CPU, ENV_EXAMPLE = ROOT / "compose.yaml", ROOT / "compose.cpu.yaml", ROOT / ".env.example"
CONFIGS: dict[str, type[ServiceConfig]] = {"decoder": DecoderConfig, "encoder": EncoderConfig, "llm": LlmConfig,
                                           "router": RouterConfig}
GPU_SERVICES = ("decoder", "encoder", "llm")
# Scale-out: deployments register every service in the Redis registry under an address others can reach;
# `mmserve up` (one host, loopback) needs neither, its router has every address from the start.
REGISTRY = {"registry_url", "advertise_address"}
# Flags compose passes that `mmserve up` leaves at their defaults: GPU tuning and the registry, by design.
# Compose's own Redis has a password; `mmserve up --redis-url` uses the given Redis as it is.
COMPOSE_ONLY = {"decoder": REGISTRY | {"redis_password_file"}, "encoder": {"dtype", "redis_password_file"} | REGISTRY,
                "llm": {"dtype", "kv_cache_bytes", "redis_password_file"} | REGISTRY,
                "router": REGISTRY | {"redis_password_file"}}
PLAN_ONLY: dict[str, set[str]] = {"decoder": set(), "encoder": set(), "llm": set(), "router": set()}

# Where compose (and the Kubernetes manifests) mount the certificates and the bearer tokens file.
TLS_MOUNT, TOKENS_FILE = "/tls", "/api-tokens/tokens"
# What turns them on in compose (.env); empty, the default, is plaintext and an open API.
TLS_ENV = {"TLS_DIR": "./certs", "API_TOKENS_FILE": "./tokens"}
# The empty named volume mounted in their place while they are off (a mount needs a source).
UNSET_VOLUME = "unset"
# The settings `mmserve up --tls-dir --api-tokens-file` configures.
TLS_FIELDS = {f.name for f in dataclasses.fields(RouterConfig) if f.name.startswith("tls_")} | {"api_tokens_file"}

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, ${VAR:+alternative}, ${VAR+alternative};
# $$ is a literal $.
_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?+])([^}]*))?\}|\$\$")


# --- helpers (tests/integration/test_compose_stack.py uses them too) -------------------------------------------

class Reset:
    """Compose's `!reset` / `!override` tag on a value."""

    def __init__(self, tag: str, value):
        self.tag, self.value = tag, value


class _Loader(yaml.SafeLoader):
    pass


for _tag in ("!reset", "!override"):
    _Loader.add_constructor(_tag, lambda loader, node, tag=_tag: Reset(
        tag, loader.construct_object(node, deep=True) if not isinstance(node, yaml.ScalarNode)
        else loader.construct_scalar(node)))


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Substitutes variables the way Compose does."""
    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.groups()
        present = name in env and (env[name] != "" or op in ("-", "?", "+"))
        if op in (":-", "-"):
            return env[name] if present else arg
        if op in (":+", "+"):
            return arg if present else ""
        if op in (":?", "?"):
            if not present:
                raise KeyError(f"{name}: {arg}")
        return env.get(name, "")
    return _VAR.sub(one, value)


def _substitute(tree, env: Mapping[str, str]):
    if isinstance(tree, str):
        return interpolate(tree, env)
    if isinstance(tree, list):
        return [_substitute(v, env) for v in tree]
    if isinstance(tree, dict):
        return {k: _substitute(v, env) for k, v in tree.items()}
    return tree


def load_compose(path: pathlib.Path = COMPOSE, env: Mapping[str, str] | None = None) -> dict:
    """The compose file with its variables substituted from env (defaults for what env lacks)."""
    return _substitute(yaml.load(path.read_text(), Loader=_Loader), env or {})


def variables(path: pathlib.Path) -> dict[str, set[str | None]]:
    """Every ${VAR} in a file and the defaults it is given there (None: no default; ${VAR:+x} gives none)."""
    found: dict[str, set[str | None]] = {}
    for match in _VAR.finditer(path.read_text()):
        if match.group(0) != "$$":
            name, op, arg = match.groups()
            defaults = found.setdefault(name, set())
            if op not in (":+", "+"):
                defaults.add(arg if op in (":-", "-") else None)
    return found


def switches(path: pathlib.Path) -> set[str]:
    """Variables that turn something on by being set (${VAR:+value} is empty while VAR is)."""
    return {m.group(1) for m in _VAR.finditer(path.read_text()) if m.group(2) in (":+", "+")}


def env_example() -> dict[str, str]:
    """.env.example's assignments; each must follow its own comment line."""
    lines, values = ENV_EXAMPLE.read_text().splitlines(), {}
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            assert lines[i - 1].startswith(f"# {name}: "), f".env.example: {name} needs a '# {name}: ...' line above it"
            values[name] = value
    return values


def parse_command(argv: list[str]) -> ServiceConfig:
    """Parses a container command (`services.<name> --flag value ...`) with that service's config class."""
    name = argv[0].removeprefix("services.")
    assert argv[0] == f"services.{name}" and name in CONFIGS, f"not a service entry point: {argv[0]}"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return CONFIGS[name].parse(argv[1:], prog=name)
    except SystemExit:
        raise AssertionError(f"{name}: {' '.join(argv[1:])}\n{stderr.getvalue()}") from None


def flag_names(argv: list[str]) -> set[str]:
    """Field names of the flags in a command line (`--kv-cache-bytes` or `--kv-cache-bytes=N` → kv_cache_bytes)."""
    return {a[2:].partition("=")[0].replace("-", "_") for a in argv if a.startswith("--")}


def planned() -> dict[str, tuple[ServiceConfig, Child]]:
    """Per service, the config and the child `mmserve up` plans when every option is used, its TLS directory and
    tokens file at the paths compose mounts them at."""
    spec = dict(model="/model", host="0.0.0.0", port=50051, redis_url="redis://redis:6379/0", media_root="/media",
                log_level="WARNING", redis_maxmemory="2gb", transport="shm", num_encoders=1, metrics=True,
                http_port=8000, tls_dir=TLS_MOUNT, api_tokens_file=TOKENS_FILE)
    # router_args passes further router flags through verbatim: no setting of its own to mirror here.
    missing = {f.name for f in dataclasses.fields(StackSpec)} - set(spec) - {"router_args", "secrets_dir"}
    assert not missing, f"StackSpec grew {missing}: use it here (a non-default value) and pass it in compose.yaml"
    with tempfile.TemporaryDirectory() as secrets_dir:  # generated secrets: only their flags matter here
        children = plan(StackSpec(**spec, secrets_dir=secrets_dir)).children()
    return {c.name: (parse_command(c.argv[2:]), c) for c in children if c.name in CONFIGS}


def planned_flags() -> dict[str, set[str]]:
    """Per service, the fields `mmserve up` sets: those plan() moves off their defaults when every option is used."""
    return {name: {f.name for f in dataclasses.fields(config) if getattr(config, f.name) != f.default}
            for name, (config, _) in planned().items()}


def tls_values(config: ServiceConfig) -> dict[str, str]:
    """A config's TLS and bearer-token settings."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in TLS_FIELDS}


def probe_tls(healthcheck: list[str]) -> tls.ClientTls | None:
    """How a health check's `python -m mmserve.probe` reaches its service (None: plaintext)."""
    assert healthcheck[:4] == ["CMD", "python", "-m", "mmserve.probe"], healthcheck
    return tls.client_tls_from_args(probe.build_parser().parse_args(healthcheck[4:]))


def mmserve_services(compose: dict) -> dict[str, dict]:
    return {name: service for name, service in compose["services"].items() if name in CONFIGS}


def option_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


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
    for path in (COMPOSE, COMPOSE_CPU):
        for name, defaults in variables(path).items():
            used.setdefault(name, set()).update(defaults)
    switched = switches(COMPOSE) | switches(COMPOSE_CPU)
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
