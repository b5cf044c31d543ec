"""A Locust User that calls the public Router API with synchronous gRPC stubs made gevent-cooperative."""

from __future__ import annotations

import logging
import time

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User

from loadtest import metrics
from loadtest.connection import Connection
from mmserve.v1 import api_pb2, api_pb2_grpc

# Before any channel exists: gRPC's C core then yields to gevent instead of blocking the hub.
grpc_gevent.init_gevent()

log = logging.getLogger(__name__)
_logged_codes: set[str] = set()


class GrpcUser(User):
    """One channel per user; generate() streams one request and fires its Locust entries."""

    abstract = True
    request_timeout_s = 120.0
    max_message_bytes = 256 * 1024 * 1024
    connection = Connection()  # TLS and token; the locustfile sets it from its options before users start

    def __init__(self, environment):
        super().__init__(environment)
        self.channel = self.connection.channel(self.host, self.max_message_bytes)
        self.stub = api_pb2_grpc.RouterStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    def generate(self, kind: str, request: api_pb2.GenerateRequest) -> list[metrics.Sample]:
        """Sends one request, reads its stream to the end, fires and returns its entries (never raises for gRPC)."""
        times = metrics.StreamTimes(start=time.perf_counter())
        try:
            for reply in self.stub.Generate(request, timeout=self.request_timeout_s,
                                            metadata=self.connection.metadata):
                times.on_reply(reply, time.perf_counter())
            times.end = time.perf_counter()
            samples = metrics.completed_samples(kind, times)
        except grpc.RpcError as err:
            times.end = time.perf_counter()
            samples = metrics.failed_samples(kind, times, err.code().name)
            _log_once(self.host, err.code().name, err.details() or "")
        for s in samples:
            self.environment.events.request.fire(
                request_type=s.request_type, name=s.name, response_time=s.response_time,
                response_length=s.response_length, exception=s.error, context={})
        return samples


def _log_once(host: str, code: str, details: str) -> None:
    """Failures group by status name in the stats; the details of each status's first one go to the log."""
    if code not in _logged_codes:
        _logged_codes.add(code)
        log.warning("%s: %s: %s", host, code, details)
