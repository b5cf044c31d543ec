"""Prometheus metrics of the router (served on the service's --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

STAGE_SECONDS = Histogram("mmserve_router_stage_seconds", "Wall time of each stage of a request, seen by the router",
                          ["stage"], buckets=_BUCKETS)
TTFT_SECONDS = Histogram("mmserve_router_ttft_seconds", "Time to first token by request class", ["cls"],
                         buckets=_BUCKETS)
REQUESTS = Counter("mmserve_router_requests_total", "Requests ended, by class and gRPC status", ["cls", "code"])
SLO = Counter("mmserve_router_slo_total", "Completed requests by whether they met their SLOs", ["cls", "outcome"])
REFUSED = Counter("mmserve_router_refused_total", "Requests refused at admission", ["cls"])
PROBES = Counter("mmserve_router_probes_total", "Requests admitted though predicted to miss, to re-measure an idle "
                 "stack whose cost models refused everything", ["cls"])
ADMISSION_QUANTILE = Gauge("mmserve_router_admission_quantile", "Quantile of actual / predicted that admission "
                           "scales predictions by (rises while admitted requests miss their SLO)")
DEGRADED = Counter("mmserve_router_degraded_total", "Requests admitted with fewer video frames", ["cls"])
RETRIES = Counter("mmserve_router_retries_total", "Stage calls retried on another replica", ["stage"])
WAITING = Gauge("mmserve_router_waiting_calls", "Stage calls waiting for a replica slot", ["stage"])
HEALTHY = Gauge("mmserve_router_healthy_replicas", "Replicas reporting SERVING", ["stage"])
BACKLOG_MS = Gauge("mmserve_router_backlog_ms", "Predicted work outstanding per stage", ["stage"])
ROLE_SWITCHES = Counter("mmserve_router_role_switches_total", "Flex replicas moved, by the stage they moved to",
                        ["stage"])
FLEX_ROLE = Gauge("mmserve_router_flex_role", "1 for the stage pool a flex replica serves in now",
                  ["replica", "stage"])
