"""`python -m mmserve.probe HOST:PORT`: exit 0 when the server's gRPC health service says SERVING, else 1."""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmserve import tls


def _channel(address: str, client_tls: tls.ClientTls | None) -> grpc.Channel:
    if client_tls is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, client_tls.credentials(), options=client_tls.options())


def check(address: str, service: str = "", timeout_s: float = 3.0,
          client_tls: tls.ClientTls | None = None) -> tuple[bool, str]:
    """Asks address's grpc.health.v1 service about service ("" is the whole server); returns (serving, why)."""
    with _channel(address, client_tls) as channel:
        try:
            # Fail fast (no wait_for_ready): a refused connection is an answer, and its reason is worth printing.
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return False, f"{address}: no health status for service {service!r}"
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return False, f"{address}: no answer within {timeout_s:g} s"
            return False, f"{address}: {err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {status}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mmserve.probe",
        description="Health probe for container orchestrators: checks the standard gRPC health service "
                    "(grpc.health.v1) and exits 0 when SERVING, 1 otherwise, printing why.")
    parser.add_argument("address", metavar="HOST:PORT", help="server to check, e.g. 127.0.0.1:50051")
    parser.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer (default: 3)")
    tls.add_client_arguments(parser)  # a TLS port; a client certificate where the server requires one (mTLS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.timeout <= 0:
        print("mmserve.probe: --timeout must be positive", file=sys.stderr)
        return 2
    try:
        client_tls = tls.client_tls_from_args(args)
        serving, why = check(args.address, args.service, args.timeout, client_tls)
    except ValueError as err:  # a TLS file that cannot be read
        print(f"mmserve.probe: {err}", file=sys.stderr)
        return 2
    print(why, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
