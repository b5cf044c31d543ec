"""Prometheus metrics of the encoder (served on the service's --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("mmserve_encoder_requests_total", "Encode requests accepted")
REFUSED = Counter("mmserve_encoder_refused_total", "Encode requests refused because the queue was full")
PATCHES = Counter("mmserve_encoder_patches_total", "Vision patches encoded")
BATCH_SIZE = Histogram("mmserve_encoder_batch_requests", "Requests encoded together in one step",
                       buckets=(1, 2, 4, 8, 16, 32, 64))
STEP_SECONDS = Histogram("mmserve_encoder_step_seconds", "Wall time of one vision-tower step",
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
QUEUED = Gauge("mmserve_encoder_queued_requests", "Requests waiting for the vision tower")
