"""Tracing: the route-decision and upstream spans, W3C trace context to the worker, trace ids
in the access log; and with tracing off, the client's traceparent passed through as is."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from router.telemetry import Tracing
from tests.integration.conftest import (
    RouterFactory,
    SimFactory,
    apoll,
    chat_body,
    set_fault,
    settings_for,
)

HEAD = "You are the tracing test assistant; answer about warehouse inventory. " * 12
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def _named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def _all_attribute_text(spans: tuple[ReadableSpan, ...]) -> str:
    return " ".join(str(v) for s in spans for v in (s.attributes or {}).values())


async def _chat(url: str, headers: dict[str, str], **extra: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=20) as client:
        return await client.post(
            url + "/v1/chat/completions", json=chat_body(HEAD, "how many bolts?", **extra),
            headers=headers,
        )  # fmt: skip


async def test_route_span_attributes_and_worker_traceparent_in_the_clients_trace(
    sims: SimFactory, router: RouterFactory
) -> None:
    """A traced request's route-decision span carries the decision, and the worker receives a
    traceparent naming the router's upstream span, all within the client's trace."""
    [sim] = sims(1)
    exporter = InMemorySpanExporter()
    running = await router(settings_for([sim]), tracing=Tracing.export_to(exporter))
    headers = {"traceparent": CLIENT_TRACEPARENT}
    assert (await _chat(running.url, headers)).status_code == 200
    exporter.clear()
    answer = await _chat(running.url, headers)
    assert answer.status_code == 200

    spans = exporter.get_finished_spans()
    [server] = _named(spans, "POST /v1/chat/completions")
    [route] = _named(spans, "prefix_router.route")
    [upstream] = _named(spans, "prefix_router.upstream")
    assert {_hex(s.context.trace_id, 32) for s in spans} == {CLIENT_TRACE}
    assert server.kind is SpanKind.SERVER
    assert server.parent is not None
    assert _hex(server.parent.span_id, 16) == CLIENT_SPAN
    assert route.parent is not None
    assert route.parent.span_id == server.context.span_id
    assert upstream.parent is not None
    assert upstream.parent.span_id == server.context.span_id
    assert upstream.kind is SpanKind.CLIENT

    attributes = dict(route.attributes or {})
    assert attributes["prefix_router.policy"] == "cache_aware"
    assert attributes["prefix_router.reason"] == "warm"
    assert attributes["prefix_router.worker"] == "w0"
    assert attributes["prefix_router.tenant_group"] == "public"
    total = attributes["prefix_router.total_blocks"]
    assert isinstance(total, int)
    assert total > 4
    assert attributes["prefix_router.matched_blocks"] == total
    assert attributes["prefix_router.best_available_blocks"] == total
    assert dict(upstream.attributes or {})["prefix_router.worker"] == "w0"
    assert dict(upstream.attributes or {})["prefix_router.attempt"] == 1
    assert dict(upstream.attributes or {})["http.response.status_code"] == 200
    assert dict(server.attributes or {})["http.response.status_code"] == 200
    # Routing sees the prompt; its spans never carry it.
    assert "warehouse" not in _all_attribute_text(spans)

    received = sim.requests(limit=1)[-1]["headers"]["traceparent"]
    expected = f"00-{CLIENT_TRACE}-{_hex(upstream.context.span_id, 16)}-01"
    assert received == expected


async def test_a_request_without_traceparent_starts_one_trace_the_worker_joins(
    sims: SimFactory, router: RouterFactory
) -> None:
    """Without a client traceparent the router starts a trace; the worker is told its id."""
    [sim] = sims(1)
    exporter = InMemorySpanExporter()
    running = await router(settings_for([sim]), tracing=Tracing.export_to(exporter))
    answer = await _chat(running.url, {}, stream=True)
    assert answer.status_code == 200
    assert "[DONE]" in answer.text

    spans = exporter.get_finished_spans()
    [server] = _named(spans, "POST /v1/chat/completions")
    [upstream] = _named(spans, "prefix_router.upstream")
    assert server.parent is None
    assert len({s.context.trace_id for s in spans}) == 1
    received = sim.requests(limit=1)[-1]["headers"]["traceparent"]
    # Flags may also carry W3C level 2's random-trace-id bit (03); sampled is what matters.
    version, trace_id, parent_id, flags = received.split("-")
    assert (version, trace_id, parent_id) == (
        "00",
        _hex(server.context.trace_id, 32),
        _hex(upstream.context.span_id, 16),
    )
    assert int(flags, 16) & 1 == 1
    assert dict(server.attributes or {})["prefix_router.stream"] is True


async def test_a_retried_request_has_one_upstream_span_per_attempt(
    sims: SimFactory, router: RouterFactory
) -> None:
    """A worker's 5xx shows as a failed upstream span; the retry gets its own attempt span."""
    workers = sims(2)
    exporter = InMemorySpanExporter()
    running = await router(settings_for(workers), tracing=Tracing.export_to(exporter))
    async with httpx.AsyncClient(timeout=10) as client:
        dry = await client.post(
            running.url + "/admin/route", json=chat_body(HEAD, "how many bolts?"),
            headers=running.admin_headers(),
        )  # fmt: skip
    first_choice = dry.json()["decision"]["worker"]
    [doomed] = [sim for sim in workers if sim.worker_id == first_choice]
    await set_fault(doomed, mode="error", status=500, count=1)
    assert (await _chat(running.url, {})).status_code == 200
    spans = exporter.get_finished_spans()
    upstreams = _named(spans, "prefix_router.upstream")
    failed = [s for s in upstreams if s.status.status_code is StatusCode.ERROR]
    assert failed, "a 500 from a worker shows as a failed upstream span"
    attempt = failed[0]
    assert dict(attempt.attributes or {})["http.response.status_code"] == 500
    retried = [
        s
        for s in _named(spans, "prefix_router.upstream")
        if s.context.trace_id == attempt.context.trace_id and s is not attempt
    ]
    assert [dict(s.attributes or {})["prefix_router.attempt"] for s in retried] == [2]
    assert len(_named(spans, "prefix_router.route")) == len(_named(spans, "prefix_router.upstream"))


async def test_with_tracing_off_the_clients_traceparent_reaches_the_worker_unchanged(
    sims: SimFactory, router: RouterFactory
) -> None:
    """Tracing off (no OTLP endpoint): no spans, and the worker gets the client's header."""
    [sim] = sims(1)
    running = await router(settings_for([sim]), tracing=Tracing.off())
    assert not running.state.tracing.enabled
    assert (await _chat(running.url, {"traceparent": CLIENT_TRACEPARENT})).status_code == 200
    assert sim.requests(limit=1)[-1]["headers"]["traceparent"] == CLIENT_TRACEPARENT
    assert (await _chat(running.url, {})).status_code == 200
    assert sim.requests(limit=1)[-1]["headers"]["traceparent"] is None


@pytest.mark.parametrize("tracing_on", [True, False])
async def test_the_access_log_line_names_the_trace(
    sims: SimFactory, router: RouterFactory, caplog: pytest.LogCaptureFixture, tracing_on: bool
) -> None:
    """The access log's trace_id is the trace the request belongs to (tracing on or off)."""
    [sim] = sims(1)
    tracing = Tracing.export_to(InMemorySpanExporter()) if tracing_on else Tracing.off()
    settings = settings_for([sim], telemetry={"access_log": True})
    running = await router(settings, tracing=tracing)
    with caplog.at_level(logging.INFO, logger="prefix_router.access"):
        answer = await _chat(running.url, {"traceparent": CLIENT_TRACEPARENT})
        assert answer.status_code == 200

        async def logged() -> bool:
            return any(r.name == "prefix_router.access" for r in caplog.records)

        await apoll(logged)
    [line] = [r for r in caplog.records if r.name == "prefix_router.access"]
    assert line.fields["trace_id"] == CLIENT_TRACE  # type: ignore[attr-defined]
