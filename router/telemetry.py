"""Metrics, structured logs and tracing: the only module that imports prometheus_client.

Every metric name lives here. The registry belongs to the app (no global registry), so two
routers in one process (tests) never share counters. Label values that come from clients
(tenant, route, prefix version) pass through a `LabelCap`, which keeps the first
``label_limit`` distinct values and folds the rest into ``other``: a client can never blow up
the number of series.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from router.config import TelemetrySettings

OTHER = "other"

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
    10.0, 20.0, 60.0,
)  # fmt: skip
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)
_FAST_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
)  # fmt: skip


class LabelCap:
    """Keeps at most ``limit`` distinct label values; later newcomers become ``other``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < self._limit:
            self._seen.add(value)
            return value
        return OTHER


class Metrics:
    """Every Prometheus series the router exports."""

    def __init__(self, settings: TelemetrySettings) -> None:
        # The *_created series double the output and no dashboard reads them.
        disable_created: Callable[[], None] = disable_created_metrics  # untyped upstream
        disable_created()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tenant_label = LabelCap(settings.label_limit)
        self.route_label = LabelCap(settings.label_limit)
        self.version_label = LabelCap(settings.label_limit)
        self.requests = Counter(
            "prefix_router_requests_total",
            "Requests answered, by route, policy, decision reason and HTTP status.",
            ["route", "policy", "reason", "status"],
            registry=r,
        )
        self.decisions = Counter(
            "prefix_router_decisions_total",
            "Routing decisions by policy and reason (spill rate = reason=spill / all).",
            ["policy", "reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "prefix_router_prompt_tokens_total",
            "Prompt tokens reported by workers (usage.prompt_tokens).",
            ["route", "tenant", "prefix_version"],
            registry=r,
        )
        self.cached_tokens = Counter(
            "prefix_router_cached_tokens_total",
            "Cached prompt tokens reported by workers (usage.prompt_tokens_details.cached_tokens).",
            ["route", "tenant", "prefix_version"],
            registry=r,
        )
        self.blocks_total = Counter(
            "prefix_router_blocks_total",
            "Full prompt blocks routed.",
            ["route"],
            registry=r,
        )
        self.blocks_available = Counter(
            "prefix_router_blocks_available_total",
            "Warm blocks available on the best worker anywhere (hit available).",
            ["route"],
            registry=r,
        )
        self.blocks_captured = Counter(
            "prefix_router_blocks_captured_total",
            "Warm blocks on the chosen worker (hit captured).",
            ["route"],
            registry=r,
        )
        self.ttft = Histogram(
            "prefix_router_ttft_seconds",
            "Time to first token seen by the router (streaming responses).",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "prefix_router_inter_token_seconds",
            "Gap between consecutive streamed chunks (inter-token latency).",
            ["route"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "prefix_router_request_seconds",
            "Whole request time in the router, first byte in to last byte out.",
            ["route", "stream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "prefix_router_upstream_headers_seconds",
            "From sending to a worker to its response headers.",
            ["worker"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.routing_seconds = Histogram(
            "prefix_router_routing_seconds",
            "Router overhead before forwarding: parse, hash, index lookup, policy.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.index_lookup_seconds = Histogram(
            "prefix_router_index_lookup_seconds",
            "Warm-index lookup latency.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.index_errors = Counter(
            "prefix_router_index_errors_total",
            "Warm-index operations that failed (routing fell back to the ring).",
            ["op"],
            registry=r,
        )
        self.backend_up = Gauge(
            "prefix_router_backend_up",
            "1 when a shared backend answers (index: warm index, loads: load board), else 0.",
            ["backend"],
            registry=r,
        )
        self.index_mispredicted = Counter(
            "prefix_router_index_mispredicted_total",
            "Responses whose cached tokens fell short of the warm depth the index predicted.",
            registry=r,
        )
        self.index_blocks = Gauge(
            "prefix_router_index_blocks",
            "Blocks remembered per worker in the warm index.",
            ["worker"],
            registry=r,
        )
        self.inflight = Gauge(
            "prefix_router_worker_inflight",
            "In-flight requests per worker from this router.",
            ["worker"],
            registry=r,
        )
        self.healthy = Gauge(
            "prefix_router_worker_healthy",
            "1 when the worker takes traffic, 0 when ejected.",
            ["worker"],
            registry=r,
        )
        self.ejections = Counter(
            "prefix_router_worker_ejections_total",
            "Times a worker was ejected by the circuit breaker.",
            ["worker"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "prefix_router_upstream_errors_total",
            "Failed attempts to a worker, by kind (connect, timeout, status_5xx, reset).",
            ["worker", "kind"],
            registry=r,
        )
        self.retries = Counter(
            "prefix_router_retries_total",
            "Requests sent again to another worker before the first byte reached the client.",
            ["route"],
            registry=r,
        )
        self.stream_errors = Counter(
            "prefix_router_stream_errors_total",
            "Streams cut after the first byte (ended with an error event).",
            ["route"],
            registry=r,
        )
        self.client_errors = Counter(
            "prefix_router_client_errors_total",
            "Requests refused before routing, by error code (bad JSON, auth, size).",
            ["code"],
            registry=r,
        )

    def worker_added(self, worker: str) -> None:
        self.inflight.labels(worker).set(0)
        self.healthy.labels(worker).set(1)
        self.ejections.labels(worker)

    def worker_removed(self, worker: str) -> None:
        for gauge in (self.inflight, self.healthy, self.index_blocks):
            with contextlib.suppress(KeyError):
                gauge.remove(worker)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra fields passed as ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


def configure_logging(settings: TelemetrySettings) -> None:
    """Route the router's logs to stderr in the configured format (called once by the CLI)."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("prefix_router")
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    root.propagate = False


def now() -> float:
    return time.perf_counter()
