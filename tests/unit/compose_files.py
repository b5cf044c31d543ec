"""Reading compose.yaml, compose.cpu.yaml, .env.example and what `mmserve up` plans: the constants and helpers that
tests/unit/test_compose.py, tests/unit/test_k8s.py and tests/integration/test_compose_stack.py share."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import pathlib
import re
import tempfile
from collections.abc import Mapping

import yaml

from mmserve import probe, tls
from mmserve.config import ServiceConfig
from stack.launcher import Child, StackSpec, plan
from stack.unified import parse as parse_unified
from services.decoder.config import DecoderConfig
from services.encoder.config import EncoderConfig
from services.llm.config import LlmConfig
from services.router.config import RouterConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE, COMPOSE_CPU, ENV_EXAMPLE = ROOT / "compose.yaml", ROOT / "compose.cpu.yaml", ROOT / ".env.example"
COMPOSE_UNIFIED = ROOT / "compose.unified.yaml"
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
                "router": REGISTRY | {"encoder_dtype", "redis_password_file"}}
# `mmserve up` starts the router with its stages and has it reconnect quickly; compose starts it once they are healthy.
PLAN_ONLY: dict[str, set[str]] = {"decoder": set(), "encoder": set(), "llm": set(),
                                  "router": {"replica_reconnect_max_ms"}}

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


class Reset:
    """Compose's `!reset` / `!override` tag on a value."""

    def __init__(self, tag: str, value):
        self.tag, self.value = tag, value


class _Loader(yaml.SafeLoader):
    pass


for _tag in ("!reset", "!override"):
    _Loader.add_constructor(_tag, lambda loader, node, tag=_tag: Reset(
        tag, loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode)
        else loader.construct_sequence(node, deep=True) if isinstance(node, yaml.SequenceNode)
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


def planned(unified: bool = False) -> dict[str, tuple[ServiceConfig, Child]]:
    """Per service, the config and the child `mmserve up` plans when every option is used, its TLS directory and
    tokens file at the paths compose mounts them at (unified: the encoder's and the llm's configs are those of the
    one `stack.unified` child)."""
    spec = dict(model="/model", host="0.0.0.0", port=50051, redis_url="redis://redis:6379/0", media_root="/media",
                log_level="WARNING", redis_maxmemory="2gb", transport="shm", num_encoders=1, metrics=True,
                http_port=8000, tls_dir=TLS_MOUNT, api_tokens_file=TOKENS_FILE, unified=unified)
    # router_args passes further router flags through verbatim: no setting of its own to mirror here.
    missing = {f.name for f in dataclasses.fields(StackSpec)} - set(spec) - {"router_args", "secrets_dir"}
    assert not missing, f"StackSpec grew {missing}: use it here (a non-default value) and pass it in compose.yaml"
    with tempfile.TemporaryDirectory() as secrets_dir:  # generated secrets: only their flags matter here
        children = plan(StackSpec(**spec, secrets_dir=secrets_dir)).children()
    configs = {c.name: (parse_command(c.argv[2:]), c) for c in children if c.name in CONFIGS}
    for child in children:
        if child.name == "unified":  # python -m stack.unified --encoder-args ... --llm-args ...
            encoder, llm, _ = parse_unified(child.argv[3:])
            configs |= {"encoder": (encoder, child), "llm": (llm, child)}
    return configs


def planned_flags(unified: bool = False) -> dict[str, set[str]]:
    """Per service, the fields `mmserve up` sets: those plan() moves off their defaults when every option is used."""
    return {name: {f.name for f in dataclasses.fields(config) if getattr(config, f.name) != f.default}
            for name, (config, _) in planned(unified).items()}


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
