"""Metrics, structured logs and tracing: the only module that imports prometheus_client or
OpenTelemetry.

Every metric name lives here. The registry belongs to the app (no global registry), so two
routers in one process (tests) never share counters. Label values that come from clients
(tenant, route, prefix version) pass through a `LabelCap`, which keeps the first
``label_limit`` distinct values and folds the rest into ``other``: a client can never blow up
the number of series. Per-worker series are removed when a worker leaves, so discovery churn
(new pod addresses) does not pile up series either.

Tracing (`Tracing`) likewise belongs to the app: its own `TracerProvider`, never the global
one. It is on when OpenTelemetry's standard variables name an OTLP endpoint; off, no span is
made at all and the client's ``traceparent`` passes through to the worker unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgspec
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from router.config import TelemetrySettings
from router.log_output import BatchingStreamHandler

OTHER = "other"
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "status_5xx", "reset", "too_large", "mid_stream")
RELOAD_SOURCES = ("sighup", "admin")
RELOAD_RESULTS = ("applied", "unchanged", "rejected")

log = logging.getLogger("prefix_router.telemetry")

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


_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)


class Metrics:
    """Every Prometheus series the router exports.

    The request path reads its labelled series through `child`, which keeps each labelled
    child once found: prometheus_client's ``labels()`` validates and locks on every call
    (microseconds, a dozen times per request). The cache is as bounded as the series are
    (client-given values pass through a `LabelCap`), and forgets a departed worker's series
    with them.
    """

    def __init__(self, settings: TelemetrySettings) -> None:
        # The *_created series double the output and no dashboard reads them.
        disable_created: Callable[[], None] = disable_created_metrics  # untyped upstream
        disable_created()
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[object, dict[tuple[str, ...], Any]] = {}
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
        self.warmup_prompt_tokens = Counter(
            "prefix_router_warmup_prompt_tokens_total",
            "Prompt tokens of requests counted as the warmup of a new prefix version (its first "
            "requests, until its cached-token ratio recovers); see docs/insights.md.",
            ["route", "tenant", "prefix_version"],
            registry=r,
        )
        self.warmup_cached_tokens = Counter(
            "prefix_router_warmup_cached_tokens_total",
            "Cached prompt tokens of requests counted as the warmup of a new prefix version.",
            ["route", "tenant", "prefix_version"],
            registry=r,
        )
        self.prefill_seconds_saved = Counter(
            "prefix_router_prefill_seconds_saved_total",
            "Prefill GPU-seconds the cached tokens saved (cached tokens / "
            "insights.prefill_tokens_per_s; only when that is set).",
            ["route", "tenant"],
            registry=r,
        )
        self.input_cost_saved = Counter(
            "prefix_router_input_cost_saved_total",
            "Input cost the cached tokens saved, in insights.currency (cached tokens x price x "
            "(1 - cached_read_multiplier); only when insights.input_price_per_mtok is set).",
            ["route", "tenant"],
            registry=r,
        )
        self.shape_flagged = Gauge(
            "prefix_router_prompt_shape_flagged",
            "1 when the prompt-shape advisor finds long recurring content behind varying "
            "content on this route (GET /admin/insights says where), else 0.",
            ["route"],
            registry=r,
        )
        self.shape_savings_tokens = Gauge(
            "prefix_router_prompt_shape_savings_tokens",
            "Prefill tokens per request a reordering of a flagged route's prompt would save.",
            ["route"],
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
        self.rate_limited = Counter(
            "prefix_router_rate_limited_total",
            "Requests refused with 429 by tenants.max_concurrent_per_tenant, by tenant group.",
            ["tenant"],
            registry=r,
        )
        self.tenant_limit_fallback = Counter(
            "prefix_router_tenant_limit_fallback_total",
            "Per-tenant limit checks that Redis could not make although loads are shared "
            "(it failed or took longer than redis.op_timeout_s), decided on this replica's "
            "estimate instead.",
            registry=r,
        )

        self.discovery_resolutions = Counter(
            "prefix_router_discovery_resolutions_total",
            "DNS resolutions of discovery.name, by result (ok, error: failed, timed out or "
            "empty; the members stay as they were).",
            ["result"],
            registry=r,
        )
        self.discovery_changes = Counter(
            "prefix_router_discovery_changes_total",
            "Workers added or removed by DNS discovery.",
            ["change"],
            registry=r,
        )
        self.reloads = Counter(
            "prefix_router_reloads_total",
            "Settings reloads by source (sighup, admin) and result (applied, unchanged, "
            "rejected: invalid, the running settings stay).",
            ["source", "result"],
            registry=r,
        )
        self.reload_restart_required = Gauge(
            "prefix_router_reload_restart_required",
            "1 when the last reload changed settings that take effect only after a restart.",
            registry=r,
        )
        self.tuning_version = Gauge(
            "prefix_router_tuning_version",
            "Version of the fleet's shared live thresholds this replica runs (0: none; "
            "replicas that differ for longer than redis.tuning_poll_s cannot read Redis).",
            registry=r,
        )
        # Series that dashboards and alerts read exist from the start, at zero.
        for result in ("ok", "error"):
            self.discovery_resolutions.labels(result)
        for change in ("added", "removed"):
            self.discovery_changes.labels(change)
        for source in RELOAD_SOURCES:
            for outcome in RELOAD_RESULTS:
                self.reloads.labels(source, outcome)

    def child(self, metric: _Metric, *values: str) -> _Metric:
        """``metric.labels(*values)``, cached."""
        children = self._children.get(metric)
        if children is None:
            children = self._children[metric] = {}
        found: _Metric | None = children.get(values)
        if found is None:
            found = children[values] = metric.labels(*values)
        return found

    def worker_added(self, worker: str) -> None:
        self.inflight.labels(worker).set(0)
        self.healthy.labels(worker).set(1)
        self.ejections.labels(worker)

    def worker_removed(self, worker: str) -> None:
        """Drop a departed worker's series; discovered workers come and go with new addresses."""
        for metric in (self.inflight, self.upstream_seconds, self.upstream_errors):
            # Cached children of removed series would count into nothing: forget them all
            # (the cache refills on the next request).
            self._children.pop(metric, None)
        for metric in (
            self.inflight, self.healthy, self.index_blocks, self.ejections, self.upstream_seconds,
        ):  # fmt: skip
            with contextlib.suppress(KeyError):
                metric.remove(worker)
        for kind in UPSTREAM_ERROR_KINDS:
            with contextlib.suppress(KeyError):
                self.upstream_errors.remove(worker, kind)

    def render(self) -> bytes:
        return generate_latest(self.registry)


_PLAIN_TYPES = frozenset((str, int, bool, float, type(None)))


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra fields passed as ``extra={"fields": {...}}``."""

    def __init__(self) -> None:
        super().__init__()
        self._encode = msgspec.json.Encoder().encode

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
        if _PLAIN_TYPES.issuperset(map(type, entry.values())):
            # The access log's common case: flat scalars, which msgspec writes about eight
            # times faster than json.dumps. Anything else (nested values, odd types) and any
            # non-ASCII text (json.dumps escapes it) keeps json.dumps's exact output.
            line = self._encode(entry).decode()
            if line.isascii():
                return line
        return json.dumps(entry, separators=(",", ":"), default=str)


def configure_logging(settings: TelemetrySettings) -> None:
    """Route the router's logs to stderr in the configured format (called once by the CLI);
    lines are written once per event-loop turn (see `router.log_output`)."""
    handler = BatchingStreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("prefix_router")
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    root.propagate = False
    # aiohttp logs requests its parser refuses (a client's garbage) with tracebacks: keep them
    # in the same one-object-per-line format, so no client can write free text into the log.
    server_log = logging.getLogger("aiohttp")
    server_log.handlers[:] = [handler]
    server_log.setLevel(logging.WARNING)
    server_log.propagate = False


# -- tracing -----------------------------------------------------------------------------------

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_TRACE_HEADERS = ("traceparent", "tracestate")
_EXPORTER_MODULES = {
    "http/protobuf": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
}
SERVICE_NAME = "prefix-router"


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` value, if well-formed and not all zeros."""
    if not traceparent:
        return None
    match = _TRACEPARENT.match(traceparent.strip())
    if match is None or match.group(1) == "0" * 32:
        return None
    return match.group(1)


class TraceSpan:
    """One span of ours; call sites use this and never touch OpenTelemetry types."""

    __slots__ = ("_span", "_tracing")

    def __init__(self, tracing: Tracing, span: otel_trace.Span) -> None:
        self._tracing = tracing
        self._span = span

    @property
    def trace_id(self) -> str:
        return format(self._span.get_span_context().trace_id, "032x")

    @property
    def span_id(self) -> str:
        return format(self._span.get_span_context().span_id, "016x")

    @property
    def recording(self) -> bool:
        """False when the sampler dropped the trace: attributes would go nowhere."""
        return self._span.is_recording()

    def child(
        self,
        name: str,
        *,
        client: bool = False,
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> TraceSpan:
        return self._tracing.start(name, self._span, client=client, attributes=attributes)

    def set(self, attributes: Mapping[str, AttributeValue]) -> None:
        if self._span.is_recording():
            self._span.set_attributes(attributes)

    def fail(self, description: str) -> None:
        self._span.set_status(Status(StatusCode.ERROR, description))

    def end(self) -> None:
        self._span.end()

    def propagation_headers(self) -> dict[str, str]:
        """``traceparent`` (and ``tracestate``) naming this span as the parent."""
        return self._tracing.inject(self._span)


class Tracing:
    """The app's tracer provider (never the global one) and W3C trace-context propagation.

    `from_env` turns tracing on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or its ``_TRACES_``
    form) is set, unless ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER`` leaves out
    ``otlp``. The exporter, sampler (``OTEL_TRACES_SAMPLER``), resource (``OTEL_SERVICE_NAME``,
    ``OTEL_RESOURCE_ATTRIBUTES``) and batching (``OTEL_BSP_*``) then read their own standard
    variables. Off, `request_span` returns None and the handlers make no span at all.
    """

    def __init__(self, provider: TracerProvider | None, description: str = "off") -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("prefix_router") if provider is not None else None
        self._propagator = TraceContextTextMapPropagator()
        self.description = description

    @classmethod
    def off(cls) -> Tracing:
        return cls(None)

    @classmethod
    def export_to(
        cls, exporter: SpanExporter, *, batch: bool = False, description: str = "custom exporter"
    ) -> Tracing:
        """Tracing into ``exporter`` (tests pass an in-memory one; ``batch`` for real ones)."""
        processor: SpanProcessor = (
            BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        )
        provider = TracerProvider(resource=_resource(), shutdown_on_exit=False)
        provider.add_span_processor(processor)
        return cls(provider, description)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Tracing:
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls.off()
        exporters = {
            name.strip().lower() for name in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")
        }
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        if "otlp" not in exporters or not endpoint:
            return cls.off()
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        ).strip()
        module_name = _EXPORTER_MODULES.get(protocol)
        if module_name is None:
            log.error(
                "tracing off: OTLP protocol %r is not supported (use http/protobuf or grpc)",
                protocol,
            )
            return cls.off()
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            log.error(
                "tracing off: the OTLP %s exporter is not installed (%s)", protocol, module_name
            )
            return cls.off()
        exporter: SpanExporter = module.OTLPSpanExporter()
        return cls.export_to(exporter, batch=True, description=f"otlp {protocol} to {endpoint}")

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def request_span(
        self,
        name: str,
        headers: Mapping[str, str],
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> TraceSpan | None:
        """The server span of one request, child of the client's trace context if it sent
        one; None when tracing is off."""
        if self._tracer is None:
            return None
        carrier = {key: value for key in _TRACE_HEADERS if (value := headers.get(key))}
        parent = self._propagator.extract(carrier) if carrier else None
        span = self._tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        return TraceSpan(self, span)

    def start(
        self,
        name: str,
        parent: otel_trace.Span,
        *,
        client: bool,
        attributes: Mapping[str, AttributeValue] | None,
    ) -> TraceSpan:
        assert self._tracer is not None, "spans exist only while tracing is on"
        span = self._tracer.start_span(
            name,
            context=otel_trace.set_span_in_context(parent),
            kind=SpanKind.CLIENT if client else SpanKind.INTERNAL,
            attributes=attributes,
        )
        return TraceSpan(self, span)

    def inject(self, span: otel_trace.Span) -> dict[str, str]:
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=otel_trace.set_span_in_context(span))
        return carrier

    async def close(self) -> None:
        """Flush and stop the exporter (in a thread: an OTLP export may block on the network)."""
        if self._provider is not None:
            provider, self._provider = self._provider, None
            await asyncio.to_thread(provider.shutdown)


def _resource() -> Resource:
    """OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES when given, else service.name=prefix-router."""
    resource = Resource.create({})
    name = resource.attributes.get("service.name")
    if not isinstance(name, str) or name.startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    return resource
