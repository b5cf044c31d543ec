"""TLS material from the config's file paths: gRPC server and channel credentials, the HTTP endpoint's SSL context."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import ssl
import subprocess

import grpc


def read_pem(field: str, path: str) -> bytes:
    """A PEM file's bytes; an unreadable file is a ValueError naming the setting."""
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{field}: cannot read {path}: {err.strerror or err}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{field}: {path} is not a PEM file")
    return data


@dataclasses.dataclass(frozen=True)
class ClientTls:
    """How a client reaches a TLS server: the CA that signed the server, and our own certificate for mutual TLS."""

    ca_file: str = ""  # empty: the system's roots
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""  # the name the server's certificate must carry, when the address does not

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("client certificate: give both the certificate and its key")

    def options(self) -> list[tuple[str, str]]:
        """Channel options: the server name override, if any."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials (files are read now, so a bad path fails here, not at the first call)."""
        roots = read_pem("tls_ca_file", self.ca_file) if self.ca_file else None
        if self.cert_file:
            return grpc.ssl_channel_credentials(roots, read_pem("tls_client_key_file", self.key_file),
                                                read_pem("tls_client_cert_file", self.cert_file))
        return grpc.ssl_channel_credentials(roots)


def client_tls(config) -> ClientTls | None:
    """The TLS a service uses on its channels to other services (None: plaintext)."""
    if not config.tls_ca_file:
        return None
    return ClientTls(config.tls_ca_file, config.tls_client_cert_file, config.tls_client_key_file,
                     config.tls_server_name)


_installed: ClientTls | None = None


def install_client(client: ClientTls | None) -> None:
    """Makes client the process's TLS for channels opened deep inside (remote tensor pulls); rpc.Service does it."""
    global _installed
    _installed = client


def installed_client() -> ClientTls | None:
    """The process's TLS for channels to other services (None: plaintext)."""
    return _installed


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """The TLS flags of our command-line clients (file paths only)."""
    parser.add_argument("--tls", action="store_true", help="connect with TLS (implied by --tls-ca-file)")
    parser.add_argument("--tls-ca-file", default="", help="PEM CA bundle that verifies the server (default: the "
                                                          "system's roots)")
    parser.add_argument("--tls-cert-file", default="", help="PEM client certificate, for servers that require one")
    parser.add_argument("--tls-key-file", default="", help="PEM private key of --tls-cert-file")
    parser.add_argument("--tls-server-name", default="",
                        help="name the server's certificate must carry, when the address does not (e.g. probing "
                             "127.0.0.1 in a container)")


def client_tls_from_args(args: argparse.Namespace) -> ClientTls | None:
    """The ClientTls the flags ask for, or None for plaintext."""
    if not (args.tls or args.tls_ca_file or args.tls_cert_file or args.tls_server_name):
        return None
    return ClientTls(args.tls_ca_file, args.tls_cert_file, args.tls_key_file, args.tls_server_name)


def server_credentials(config) -> grpc.ServerCredentials | None:
    """TLS for a service's port (None: plaintext); with tls_client_ca_file, clients must present a certificate."""
    if not config.tls_cert_file:
        return None
    pair = (read_pem("tls_key_file", config.tls_key_file), read_pem("tls_cert_file", config.tls_cert_file))
    if config.tls_client_ca_file:
        return grpc.ssl_server_credentials([pair], read_pem("tls_client_ca_file", config.tls_client_ca_file),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials([pair])


def http_ssl_context(config) -> ssl.SSLContext | None:
    """The HTTP endpoint's TLS: the same certificate as the gRPC port, and the same client-certificate rule."""
    if not config.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
        if config.tls_client_ca_file:
            context.load_verify_locations(config.tls_client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as err:
        raise ValueError(f"tls_cert_file: cannot load {config.tls_cert_file} / {config.tls_key_file}: {err}") from None
    return context


def make_dev_certs(directory: str | pathlib.Path, names: tuple[str, ...] = ("localhost", "127.0.0.1"),
                   days: int = 825) -> pathlib.Path:
    """A private CA and a server and a client certificate signed by it, for development and tests (openssl CLI).

    Writes ca.pem, server.pem/server.key and client.pem/client.key (the layout `mmserve up --tls-dir` reads);
    the CA's own key is not kept, so nothing more can be signed with it.
    """
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    san = ",".join(f"IP:{n}" if n.replace(".", "").isdigit() or ":" in n else f"DNS:{n}" for n in names)

    def openssl(*args: str) -> None:
        # umask 077: a private key is never readable by others, not even for a moment.
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=out, preexec_fn=lambda: os.umask(0o077))

    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", str(days),
            "-subj", "/CN=mmserve development CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for role, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        openssl("req", *key, "-keyout", f"{role}.key", "-out", f"{role}.csr", "-subj", f"/CN=mmserve {role}")
        (out / f"{role}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n"
                                         "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n")
        openssl("x509", "-req", "-in", f"{role}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{role}.pem", "-days", str(days), "-extfile", f"{role}.ext")
    for leftover in ("ca.key", "ca.srl", "server.csr", "client.csr", "server.ext", "client.ext"):
        (out / leftover).unlink(missing_ok=True)
    for public in ("ca.pem", "server.pem", "client.pem"):
        (out / public).chmod(0o644)
    return out
