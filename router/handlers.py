"""The public HTTP surface: OpenAI endpoints, health, readiness and metrics.

With tracing on, each inference request gets a server span (a child of the client's
``traceparent`` when it sent one); the proxy hangs the route-decision and upstream spans
under it. The access log line carries the trace id: ours with tracing on, else the client's.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time

from aiohttp import web

from router import spans
from router.errors import (
    BodyTooLarge,
    NoHealthyWorker,
    RateLimited,
    RouterError,
    ShuttingDown,
    UpstreamError,
)
from router.insights import InsightsRecorder, InsightTicket
from router.log_output import log_fields
from router.parse import Endpoint, forward_body, parse_request
from router.proxy import Exchange
from router.routing import Usage
from router.state import STATE, RouterState
from router.telemetry import Metrics, trace_id_of

log = logging.getLogger("prefix_router.access")
insights_log = logging.getLogger("prefix_router.insights")

INSIGHTS: web.AppKey[InsightsRecorder | None] = web.AppKey("prefix_router_insights")
"""The app's insights recorder (None with ``insights.enabled: false``)."""


class RequestIds:
    """Request ids for requests that came without one: a random per-process prefix and a
    counter, 32 hex digits like a UUID's, unique across processes and restarts at the cost of
    one increment (``uuid4`` reads the OS's random source on every call)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._serial = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._serial):016x}"


REQUEST_IDS: web.AppKey[RequestIds] = web.AppKey("prefix_router_request_ids", RequestIds)
"""Ids for the app's requests that came without one (set by `add_routes`)."""

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_TRACE_HEADERS = ("traceparent", "tracestate")
_PATHS: dict[Endpoint, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def request_id_of(request: web.Request, request_ids: RequestIds) -> str:
    given = request.headers.get("x-request-id")
    return given if given is not None and _REQUEST_ID.match(given) else request_ids.next()


async def read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"request body is {request.content_length} bytes; the limit is {limit}")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes") from None


def upstream_headers(state: RouterState, request: web.Request, request_id: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "x-request-id": request_id}
    for name in _TRACE_HEADERS:
        value = request.headers.get(name)
        if value is not None and len(value) <= 512:
            headers[name] = value
    api_key = state.settings.upstream.api_key
    if api_key is not None:
        headers["Authorization"] = "Bearer " + api_key.get_secret_value()
    return headers


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _inference(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _inference(request, "completions")


async def _inference(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    state = request.app[STATE]
    insights = request.app.get(INSIGHTS)
    metrics = state.metrics
    server = state.settings.server
    exchange = Exchange(
        request_id=request_id_of(request, request.app[REQUEST_IDS]),
        endpoint=endpoint,
        route=metrics.route_label(request.headers.get(server.route_header) or endpoint),
        stream=False,
        started=time.perf_counter(),
        prefix_version=request.headers.get(server.prefix_version_header, ""),
    )
    path = _PATHS[endpoint]
    exchange.trace = spans.start_request(state.tracing, path, request.headers, exchange)
    if exchange.trace is not None:
        exchange.trace_id = exchange.trace.trace_id
    elif state.settings.telemetry.access_log:
        exchange.trace_id = trace_id_of(request.headers.get("traceparent"))
    counted = False
    gated: str | None = None
    try:
        if state.draining:
            raise ShuttingDown("the router is shutting down; retry on another replica")
        state.inflight.enter()
        counted = True
        exchange.tenant = state.tenants.resolve(request.headers)
        limit = state.settings.tenants.max_concurrent_per_tenant
        admission = await state.tenant_gate.enter(exchange.tenant, limit)
        if admission.fallback:
            # Redis could not decide (down or slow): this replica's estimate did, fail open.
            metrics.tenant_limit_fallback.inc()
        if not admission.admitted:
            metrics.rate_limited.labels(metrics.tenant_label(exchange.tenant)).inc()
            raise RateLimited(f"too many concurrent requests for this tenant (limit {limit})")
        gated = exchange.tenant
        raw = await read_body(request, server.max_body_bytes)
        parsed = parse_request(endpoint, raw)
        exchange.stream = parsed.stream
        salt = state.tenants.cache_salt(exchange.tenant)
        route_request = await state.router.plan(parsed, exchange.tenant, salt)
        if insights is not None:
            ticket = insights.begin(endpoint, parsed.model, request.headers, exchange.tenant)
            if ticket.sample:
                ticket.attach(endpoint, parsed.model, parsed.body, route_request.chain)
            exchange.insight = ticket
        body = forward_body(parsed, salt)
        headers = upstream_headers(state, request, exchange.request_id)
        metrics.routing_seconds.observe(time.perf_counter() - exchange.started)
        return await state.forwarder.forward(
            request, exchange, parsed, route_request, path, body, headers
        )
    except RouterError as exc:
        exchange.status = exc.status
        exchange.error = exc.message
        if exchange.decision is None:
            metrics.client_errors.labels(exc.code or exc.type).inc()
        raise
    except BaseException:
        exchange.status = 500
        exchange.error = exchange.error or "internal error"
        raise
    finally:
        if gated is not None:
            state.tenant_gate.leave(gated)
        if counted:
            state.inflight.leave()
        _record(state, exchange, insights)


def _record(state: RouterState, exchange: Exchange, insights: InsightsRecorder | None) -> None:
    metrics = state.metrics
    decision = exchange.decision
    reason = decision.reason if decision is not None else "none"
    elapsed = time.perf_counter() - exchange.started
    child = metrics.child
    route = exchange.route
    child(metrics.requests, route, state.router.policy.name, reason, str(exchange.status)).inc()
    child(metrics.request_seconds, route, "true" if exchange.stream else "false").observe(elapsed)
    usage = exchange.usage
    if decision is not None and exchange.status == 200:
        child(metrics.blocks_total, route).inc(decision.total_blocks)
        child(metrics.blocks_available, route).inc(decision.best_available_blocks)
        child(metrics.blocks_captured, route).inc(decision.matched_blocks)
    if usage is not None:
        labels = (
            exchange.route,
            metrics.tenant_label(exchange.tenant),
            metrics.version_label(exchange.prefix_version or "unversioned"),
        )
        child(metrics.prompt_tokens, *labels).inc(usage.prompt_tokens)
        child(metrics.cached_tokens, *labels).inc(usage.cached_tokens or 0)
        ticket = exchange.insight
        if insights is not None and ticket is not None and exchange.status == 200:
            _record_insights(metrics, insights, exchange, ticket, usage, labels)
    if exchange.trace is not None:
        spans.end_request(exchange)
    if not state.settings.telemetry.access_log:
        return
    fields: dict[str, object] = {
        "request_id": exchange.request_id,
        "trace_id": exchange.trace_id,
        "route": exchange.route,
        "tenant": exchange.tenant,
        "prefix_version": exchange.prefix_version or None,
        "stream": exchange.stream,
        "status": exchange.status,
        "worker": exchange.worker,
        "attempts": exchange.attempts,
        "duration_ms": round(elapsed * 1000, 2),
    }
    if decision is not None:
        fields.update(
            reason=decision.reason,
            matched_blocks=decision.matched_blocks,
            best_blocks=decision.best_available_blocks,
            total_blocks=decision.total_blocks,
        )
    if usage is not None:
        fields.update(prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens)
    if exchange.ttft is not None:
        fields["ttft_ms"] = round(exchange.ttft * 1000, 2)
        fields["decode_ms"] = round((elapsed - exchange.ttft) * 1000, 2)
    if exchange.retried_from:
        fields["retried_from"] = exchange.retried_from
    if exchange.error is not None:
        fields["error"] = exchange.error
    log_fields(log, "request", fields)


def _record_insights(
    metrics: Metrics,
    insights: InsightsRecorder,
    exchange: Exchange,
    ticket: InsightTicket,
    usage: Usage,
    labels: tuple[str, str, str],
) -> None:
    """Savings and versions from the usage; the shape analysis of a sampled request runs
    on the next loop turn, after the response went out (it is the costly part)."""
    outcome = insights.finish(
        ticket, usage.prompt_tokens, usage.cached_tokens, exchange.ttft, exchange.prefix_version
    )
    if outcome.warmup:
        metrics.warmup_prompt_tokens.labels(*labels).inc(usage.prompt_tokens)
        metrics.warmup_cached_tokens.labels(*labels).inc(usage.cached_tokens or 0)
    if outcome.prefill_seconds_saved:
        metrics.prefill_seconds_saved.labels(labels[0], labels[1]).inc(
            outcome.prefill_seconds_saved
        )
    if outcome.cost_saved:
        metrics.input_cost_saved.labels(labels[0], labels[1]).inc(outcome.cost_saved)
    if ticket.sample and ticket.body is not None:
        asyncio.get_running_loop().call_soon(_analyse, insights, ticket, usage.prompt_tokens)


def _analyse(insights: InsightsRecorder, ticket: InsightTicket, prompt_tokens: int) -> None:
    try:
        insights.analyse(ticket, prompt_tokens)
    except Exception:
        # Insights must never cost a request; the traceback names no prompt text.
        insights_log.warning("prompt-shape analysis failed", exc_info=True)


def update_insight_gauges(metrics: Metrics, insights: InsightsRecorder | None) -> None:
    """The advisor's verdict per route, as gauges (set at scrape time)."""
    if insights is None:
        return
    for route, (flagged, savings) in insights.route_flags().items():
        label = metrics.route_label(route)
        metrics.shape_flagged.labels(label).set(1 if flagged else 0)
        metrics.shape_savings_tokens.labels(label).set(savings)


async def models(request: web.Request) -> web.Response:
    """The workers' model list, from the first healthy worker that answers."""
    state = request.app[STATE]
    state.tenants.resolve(request.headers)
    workers = state.pool.routable()
    if not workers:
        raise NoHealthyWorker("no healthy worker available")
    last: Exception | None = None
    for worker in workers[:3]:
        try:
            status, raw = await state.upstream.get(
                worker, "/v1/models", state.settings.health.probe_timeout_s * 5
            )
        except Exception as exc:
            last = exc
            continue
        if status == 200:
            return web.Response(body=raw, content_type="application/json")
        last = UpstreamError(f"worker {worker.id} answered HTTP {status}")
    raise UpstreamError(f"no worker listed its models: {last}")


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    healthy = len(state.pool.routable())
    if state.draining:
        return web.json_response({"ready": False, "reason": "shutting down"}, status=503)
    if healthy == 0:
        return web.json_response({"ready": False, "reason": "no healthy worker"}, status=503)
    return web.json_response({"ready": True, "healthy_workers": healthy})


async def metrics_endpoint(request: web.Request) -> web.Response:
    state = request.app[STATE]
    metrics = state.metrics
    index_sizes = state.index.stats()
    metrics.backend_up.labels("index").set(1 if state.index.available else 0)
    metrics.backend_up.labels("loads").set(1 if state.router.loads.available else 0)
    for worker in state.pool.members():
        metrics.healthy.labels(worker.id).set(1 if worker.state == "healthy" else 0)
        metrics.index_blocks.labels(worker.id).set(index_sizes.get(worker.id, 0))
    update_insight_gauges(metrics, request.app.get(INSIGHTS))
    return web.Response(
        body=metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


def add_routes(app: web.Application) -> None:
    app[REQUEST_IDS] = RequestIds()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics_endpoint)
