"""Config base: one frozen dataclass per service, CLI flags derived from its fields."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Self


def option(default: Any, doc: str) -> Any:
    """A config field with its one-line documentation (shown by --help)."""
    return dataclasses.field(default=default, metadata={"doc": doc})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """Settings every gRPC service shares."""

    host: str = option("127.0.0.1", "address to bind; internal services stay on loopback unless told otherwise")
    port: int = option(0, "gRPC port (0 picks a free one)")
    metrics_port: int = option(0, "Prometheus metrics HTTP port (0 disables the endpoint)")
    max_message_bytes: int = option(256 * 1024 * 1024, "largest gRPC message sent or received")
    max_concurrent_rpcs: int = option(1024, "RPCs in flight before the server answers RESOURCE_EXHAUSTED")
    grace_s: float = option(5.0, "seconds in-flight RPCs get to finish on SIGTERM")
    log_level: str = option("INFO", "logging level")

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536 or not 0 <= self.metrics_port < 65536:
            raise ValueError("port: must be in 0..65535")
        if self.max_message_bytes < 1024 * 1024:
            raise ValueError("max_message_bytes: must be at least 1 MiB")
        if self.max_concurrent_rpcs < 1:
            raise ValueError("max_concurrent_rpcs: must be positive")
        if self.grace_s < 0:
            raise ValueError("grace_s: must not be negative")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Adds one flag per field (`max_num_seqs` → `--max-num-seqs`)."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            doc = f.metadata.get("doc", "")
            default = f.default
            if kind is bool:
                parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=doc)
            else:
                parser.add_argument(_flag(f.name), type=kind, default=default, help=f"{doc} (default: {default})")

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
