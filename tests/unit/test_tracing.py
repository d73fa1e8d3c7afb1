"""Tracing configuration from OpenTelemetry's standard variables, the app's own provider,
and trace-context helpers."""

from __future__ import annotations

import logging

import pytest
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from router.config import otel_env
from router.telemetry import Tracing, trace_id_of

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_SERVICE_NAME": "router"},
        {**ENDPOINT, "OTEL_SDK_DISABLED": "true"},
        {**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"},
    ],
)
def test_tracing_is_off_without_an_endpoint_or_when_disabled(env: dict[str, str]) -> None:
    """No OTLP endpoint (or the SDK disabled, or the exporter set to none): no spans at all."""
    tracing = Tracing.from_env(env)
    assert not tracing.enabled
    assert tracing.request_span("POST /v1/completions", {"traceparent": "x"}) is None


async def test_an_otlp_endpoint_turns_tracing_on() -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT (or the traces-only variable) turns on OTLP over HTTP."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    for env in (ENDPOINT, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}):
        tracing = Tracing.from_env(env)
        assert tracing.enabled
        assert tracing.description.startswith("otlp http/protobuf to ")
        await tracing.close()


def test_an_unsupported_protocol_leaves_tracing_off_with_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A protocol the router cannot speak is logged as an error, and the router runs on."""
    with caplog.at_level(logging.ERROR, logger="prefix_router.telemetry"):
        tracing = Tracing.from_env({**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    assert not tracing.enabled
    assert "not supported" in caplog.text


def test_the_app_provider_is_not_the_global_one() -> None:
    """Tracing never installs a global tracer provider (two apps never share spans)."""
    before = otel_trace.get_tracer_provider()
    exporter = InMemorySpanExporter()
    tracing = Tracing.export_to(exporter)
    span = tracing.request_span("POST /v1/chat/completions", {})
    assert span is not None
    span.end()
    assert otel_trace.get_tracer_provider() is before
    assert [s.name for s in exporter.get_finished_spans()] == ["POST /v1/chat/completions"]
    resource = exporter.get_finished_spans()[0].resource
    assert resource.attributes["service.name"] == "prefix-router"


def test_spans_propagate_w3c_trace_context() -> None:
    """A child of the client's traceparent keeps its trace id; the header names our span."""
    tracing = Tracing.export_to(InMemorySpanExporter())
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    request = tracing.request_span("POST /v1/completions", {"traceparent": incoming})
    assert request is not None
    upstream = request.child("prefix_router.upstream", client=True)
    headers = upstream.propagation_headers()
    version, trace_id, parent, _flags = headers["traceparent"].split("-")
    assert (version, trace_id, parent) == ("00", request.trace_id, upstream.span_id)
    assert request.trace_id == "0af7651916cd43dd8448eb211c80319c"


def test_a_malformed_traceparent_starts_a_new_trace() -> None:
    """Garbage in traceparent is ignored: the request gets a fresh trace of its own."""
    tracing = Tracing.export_to(InMemorySpanExporter())
    span = tracing.request_span("POST /v1/completions", {"traceparent": "00-zz-yy-01"})
    assert span is not None
    assert len(span.trace_id) == 32
    assert span.trace_id != "0" * 32


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
         "0af7651916cd43dd8448eb211c80319c"),
        ("00-00000000000000000000000000000000-b7ad6b7169203331-01", None),
        ("garbage", None),
        (None, None),
    ],
)  # fmt: skip
def test_trace_id_of_reads_only_well_formed_headers(
    header: str | None, expected: str | None
) -> None:
    """The access log's trace id comes only from a valid, non-zero traceparent."""
    assert trace_id_of(header) == expected


def test_otel_env_takes_only_the_otel_variables() -> None:
    """The settings module hands telemetry the OTEL_* variables and nothing else."""
    env = {"OTEL_SERVICE_NAME": "r", "PREFIX_ROUTER_SERVER__PORT": "1", "HOME": "/root"}
    assert otel_env(env) == {"OTEL_SERVICE_NAME": "r"}
