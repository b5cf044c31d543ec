"""How the load test reaches the router: TLS and a bearer token, from the same flags as `mmserve generate`.

Free of gevent and Locust, so run.py checks the flags (and reads the files) before Locust starts, and tests use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

import grpc

from mmserve import auth, tls


def add_arguments(parser) -> None:
    """--tls, --tls-ca-file, --tls-cert-file, --tls-key-file, --tls-server-name (as `mmserve generate`), --token-file.

    parser is an argparse parser or group (Locust's argument group too).
    """
    tls.add_client_arguments(parser)
    parser.add_argument("--token-file", default="", help="file holding the bearer token to send (default: "
                                                          "$MMSERVE_API_TOKEN)")


@dataclasses.dataclass(frozen=True)
class Connection:
    """The TLS of the channel (None: plaintext) and the bearer token every request carries (None: none)."""

    client_tls: tls.ClientTls | None = None
    token: str | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The call metadata of every request: the Authorization header when there is a token."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def channel(self, address: str, max_message_bytes: int) -> grpc.Channel:
        """A blocking channel to the router (gevent-cooperative inside Locust)."""
        from mmserve.client import open_channel  # imports torch (through mmserve.rpc): not for run.py --help

        return open_channel(address, max_message_bytes, self.client_tls)

    def aio_channel(self, address: str, max_message_bytes: int) -> grpc.aio.Channel:
        """An asyncio channel to the router (soak.py)."""
        from mmserve import rpc  # imports torch: not for run.py --help

        return rpc.channel(address, max_message_bytes, self.client_tls)


def from_args(args: argparse.Namespace) -> Connection:
    """The connection the flags ask for; reads the files now, so a bad path is a ValueError naming the setting."""
    client_tls = tls.client_tls_from_args(args)
    if client_tls is not None:
        client_tls.credentials()  # reads and checks the PEM files
    return Connection(client_tls, auth.client_token(args.token_file))


def forwarded(args: argparse.Namespace) -> list[str]:
    """The flags given, again, for the Locust command line: file paths made absolute (Locust runs from the
    repository root); the token itself never appears on a command line."""
    argv = ["--tls"] if args.tls else []
    for field in ("tls_ca_file", "tls_cert_file", "tls_key_file", "token_file"):
        if path := getattr(args, field):
            argv += ["--" + field.replace("_", "-"), str(pathlib.Path(path).resolve())]
    if args.tls_server_name:
        argv += ["--tls-server-name", args.tls_server_name]
    return argv
