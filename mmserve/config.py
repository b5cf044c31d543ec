"""Config base: one frozen dataclass per service, CLI flags derived from its fields."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import typing
from typing import Any, Self

# Compute dtypes of the model-running services; "auto" is resolved by mmserve.models.loading.resolve_dtype.
DTYPES = ("auto", "float32", "bfloat16", "float16")


def option(default: Any, doc: str) -> Any:
    """A config field with its one-line documentation (shown by --help)."""
    return dataclasses.field(default=default, metadata={"doc": doc})


def is_loopback(host: str) -> bool:
    """Whether a bind address is reachable from this host only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost, or "" (every address)
        return False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(cls: type, parser: argparse.ArgumentParser) -> None:
    """Adds one flag per field of a config dataclass (`max_num_seqs` → `--max-num-seqs`), its doc as the help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        doc = f.metadata.get("doc", "")
        default = f.default
        if kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=doc)
        else:
            parser.add_argument(_flag(f.name), type=kind, default=default, help=f"{doc} (default: {default})")


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """Settings every gRPC service shares."""

    host: str = option("127.0.0.1", "address to bind; internal services stay on loopback unless told otherwise")
    port: int = option(0, "gRPC port (0 picks a free one)")
    metrics_port: int = option(0, "Prometheus metrics HTTP port (0 disables the endpoint)")
    max_message_bytes: int = option(256 * 1024 * 1024, "largest gRPC message sent or received")
    max_concurrent_rpcs: int = option(1024, "RPCs in flight before the server answers RESOURCE_EXHAUSTED "
                                            "(health checks and reflection are not counted)")
    grace_s: float = option(5.0, "seconds in-flight RPCs get to finish on SIGTERM")
    log_level: str = option("INFO", "logging level")
    nice: int = option(0, "niceness added to the process at start, 0-19 (higher: gives way to the others on "
                          "shared cores)")
    transport: str = option("auto", "tensors we produce: auto (shared memory for callers on this host, a "
                                    "remote pull for callers elsewhere), shm (shared memory whenever possible), "
                                    "remote (consumers pull from us over gRPC) or inline")
    inline_limit_bytes: int = option(64 * 1024, "tensors smaller than this always travel inline")
    lease_s: float = option(120.0, "seconds a shared-memory tensor waits for its consumer before it is freed")
    registry_url: str = option("", "Redis URL of the replica registry this service announces itself in "
                                   "(empty: not registered; the router then needs static addresses)")
    advertise_address: str = option("", "host:port other services reach this one at (default: host:port)")
    # TLS settings are file paths only: secrets never appear on a command line.
    tls_cert_file: str = option("", "PEM certificate (chain) this server presents; with tls_key_file the port "
                                    "speaks TLS (empty: plaintext)")
    tls_key_file: str = option("", "PEM private key of tls_cert_file")
    tls_client_ca_file: str = option("", "PEM CA bundle: clients must present a certificate it signed (mutual TLS; "
                                         "needs tls_cert_file)")
    tls_ca_file: str = option("", "PEM CA bundle that verifies the services this one calls; set, its channels to "
                                  "them use TLS")
    tls_client_cert_file: str = option("", "PEM certificate this service presents to the services it calls "
                                           "(mutual TLS; needs tls_ca_file)")
    tls_client_key_file: str = option("", "PEM private key of tls_client_cert_file")
    tls_server_name: str = option("", "name the certificates of the services this one calls carry, when their "
                                      "addresses do not (e.g. pod IPs; empty: the address's host; needs tls_ca_file)")

    # Secrets of the stack, file paths too (`mmserve up` generates both; `mmserve secrets` writes them for compose).
    internal_token_file: str = option("", "file holding the stack's internal token: every call between the services "
                                          "carries it and a stage refuses calls without it (health stays open); "
                                          "needed by a stage bound to a non-loopback host unless it requires mutual "
                                          "TLS (empty: none)")
    redis_password_file: str = option("", "file holding the password of the Redis in redis_url and registry_url "
                                          "(empty: none)")

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536 or not 0 <= self.metrics_port < 65536:
            raise ValueError("port: must be in 0..65535")
        if self.inline_limit_bytes < 0:
            raise ValueError("inline_limit_bytes: must not be negative")
        if not self.lease_s > 0:
            raise ValueError("lease_s: must be positive")
        if self.max_message_bytes < 1024 * 1024:
            raise ValueError("max_message_bytes: must be at least 1 MiB")
        if self.max_concurrent_rpcs < 1:
            raise ValueError("max_concurrent_rpcs: must be positive")
        if self.grace_s < 0:
            raise ValueError("grace_s: must not be negative")
        if not 0 <= self.nice <= 19:
            raise ValueError("nice: must be in 0..19 (a process may lower its own priority, not raise it)")
        self.check_tls_options()
        self.check_exposure()

    def check_exposure(self) -> None:
        """Raises ValueError when a stage would answer the network with no credential (a public API, which has its
        own tokens, may)."""
        if (not isinstance(self, AuthOptions) and not is_loopback(self.host)
                and not self.internal_token_file and not self.tls_client_ca_file):
            raise ValueError(f"host: {self.host or 'every address'} is reachable from other hosts; a stage there needs "
                             "internal_token_file or mutual TLS (tls_client_ca_file)")

    def check_tls_options(self) -> None:
        """Raises ValueError naming the TLS setting that lacks its partner."""
        for cert, key in (("tls_cert_file", "tls_key_file"), ("tls_client_cert_file", "tls_client_key_file")):
            if bool(getattr(self, cert)) != bool(getattr(self, key)):
                given, missing = (cert, key) if getattr(self, cert) else (key, cert)
                raise ValueError(f"{given}: needs {missing} too")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file: needs tls_cert_file (client certificates are checked over TLS)")
        if self.tls_client_cert_file and not self.tls_ca_file:
            raise ValueError("tls_client_cert_file: needs tls_ca_file (a client certificate is presented over TLS)")
        if self.tls_server_name and not self.tls_ca_file:
            raise ValueError("tls_server_name: needs tls_ca_file (the name is checked over TLS)")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Adds one flag per field (`max_num_seqs` → `--max-num-seqs`)."""
        add_flags(cls, parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        """Builds the config from parsed flags."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def parse(cls, argv: list[str] | None = None, prog: str | None = None) -> Self:
        """Parses a command line into the config."""
        parser = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
        cls.add_arguments(parser)
        return cls.from_args(parser.parse_args(argv))

    def with_flags(self, argv: list[str]) -> Self:
        """This config with command-line flags applied on top of it (the last occurrence of a flag wins)."""
        parser = argparse.ArgumentParser(prog=type(self).__name__)
        self.add_arguments(parser)
        parser.set_defaults(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        return self.from_args(parser.parse_args(argv))

    def to_argv(self) -> list[str]:
        """The command line that reproduces this config (for spawning a service)."""
        argv: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                argv.append(_flag(f.name) if value else "--no-" + f.name.replace("_", "-"))
            else:
                argv += [_flag(f.name), str(value)]
        return argv


@dataclasses.dataclass(frozen=True)
class AuthOptions:
    """Bearer tokens of a public API (mix in after ServiceConfig); the server requires one when any is configured."""

    api_tokens_file: str = option("", "file of bearer tokens the API accepts, one per line (# comments and blank "
                                      "lines skipped); MMSERVE_API_TOKENS (comma-separated) adds more; none: open")


def with_default(mixin: type, name: str, default: Any) -> Any:
    """A mixin's field redeclared with another default (same doc), for the one service whose default differs."""
    return option(default, mixin.__dataclass_fields__[name].metadata["doc"])


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """Model settings of the services that run a model (mix in after ServiceConfig)."""

    model: str = option("", "checkpoint directory or hub id")
    dtype: str = option("auto", "compute dtype of the weights (and of the llm's KV cache): auto (the checkpoint's, "
                                "when the device computes it in hardware; else float32), float32, bfloat16 or float16")
    device: str = option("auto", "cpu, cuda, cuda:N, or auto (the first GPU when one is visible)")
    max_queue: int = option(256, "requests waiting before new ones get RESOURCE_EXHAUSTED")
    num_threads: int = option(0, "torch intra-op threads (0 keeps torch's default)")

    def check_model_options(self) -> None:
        """Raises ValueError naming the first model field that is missing or out of range."""
        if not self.model:
            raise ValueError("model: required")
        if self.num_threads < 0:
            raise ValueError("num_threads: must not be negative")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.max_queue < 1:
            raise ValueError("max_queue: must be positive")


@dataclasses.dataclass(frozen=True)
class CacheOptions:
    """Embedding-cache settings, shared by the services that read or write the cache (mix in after ServiceConfig)."""

    redis_url: str = option("", "embedding cache, e.g. redis://127.0.0.1:6379/0 (empty disables the cache)")
    cache_ttl_s: int = option(24 * 3600, "embedding cache entry lifetime")
    cache_timeout_ms: int = option(50, "Redis operation timeout; slower means a miss, never an error")
    cache_local_bytes: int = option(256 * 1024 * 1024, "in-process LRU in front of Redis (0 disables it)")

    def check_cache_options(self) -> None:
        """Raises ValueError naming the first cache field that is out of range."""
        if self.cache_ttl_s < 1:
            raise ValueError("cache_ttl_s: must be positive")
        if self.cache_timeout_ms < 1:
            raise ValueError("cache_timeout_ms: must be at least 1")
        if self.cache_local_bytes < 0:
            raise ValueError("cache_local_bytes: must not be negative")
