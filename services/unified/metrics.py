"""Prometheus metrics of a unified replica's arbiter (on either role's --metrics-port: one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

DEVICE_SECONDS = Counter("mmserve_unified_device_seconds_total", "Device time held, by role", ["role"])
SLICES_DEFERRED = Counter("mmserve_unified_slices_deferred_total",
                          "Encoder slices deferred to a later gap so the running decodes keep their time per token")
WAIT_SECONDS = Histogram("mmserve_unified_device_wait_seconds", "Time a role waited for its turn on the device",
                         ["role"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
