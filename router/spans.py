"""What each span of a request is called and says: the one place for span names and
attributes, as `router.telemetry` is for metric names (and it only ever touches `TraceSpan`).

    POST /v1/chat/completions   server; a child of the client's traceparent, if any
    ├── prefix_router.route     one per attempt: policy, reason, matched / best / total
    │                           blocks, worker, load, cap, affinity worker, tenant group
    └── prefix_router.upstream  one per attempt (client): worker, attempt, url, status;
                                the worker receives its context as ``traceparent``

Attributes never hold prompt text, only counts and names; the tenant appears as its metric
label (capped by ``telemetry.label_limit``), not as a free-form value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from router.core.model import Decision
from router.telemetry import TraceSpan, Tracing

if TYPE_CHECKING:
    from router.proxy import Exchange

ROUTE = "prefix_router.route"
UPSTREAM = "prefix_router.upstream"


def start_request(
    tracing: Tracing, path: str, headers: Mapping[str, str], exchange: Exchange
) -> TraceSpan | None:
    """The request's server span (None with tracing off, at the cost of one check)."""
    if not tracing.enabled:
        return None
    return tracing.request_span(
        f"POST {path}",
        headers,
        {"http.request.method": "POST", "http.route": path, "url.path": path,
         "prefix_router.request_id": exchange.request_id, "prefix_router.route": exchange.route},
    )  # fmt: skip


def end_request(exchange: Exchange) -> None:
    """Close the request's server span with what the request did."""
    trace = exchange.trace
    assert trace is not None
    if trace.recording:
        attributes: dict[str, str | int | bool] = {
            "http.response.status_code": exchange.status,
            "prefix_router.stream": exchange.stream,
            "prefix_router.attempts": exchange.attempts,
        }
        if exchange.worker is not None:
            attributes["prefix_router.worker"] = exchange.worker
        if exchange.decision is not None:
            attributes["prefix_router.reason"] = exchange.decision.reason
        if exchange.usage is not None:
            attributes["prefix_router.prompt_tokens"] = exchange.usage.prompt_tokens
            attributes["prefix_router.cached_tokens"] = exchange.usage.cached_tokens or 0
        trace.set(attributes)
    if exchange.status >= 500:
        trace.fail(exchange.error or f"HTTP {exchange.status}")
    trace.end()


def start_route(exchange: Exchange, attempt: int) -> TraceSpan | None:
    if exchange.trace is None:
        return None
    return exchange.trace.child(ROUTE, attributes={"prefix_router.attempt": attempt})


def end_route(
    span: TraceSpan, decision: Decision, *, policy: str, load: int, tenant_group: str
) -> None:
    if span.recording:
        attributes: dict[str, str | int] = {
            "prefix_router.policy": policy,
            "prefix_router.reason": decision.reason,
            "prefix_router.matched_blocks": decision.matched_blocks,
            "prefix_router.best_available_blocks": decision.best_available_blocks,
            "prefix_router.total_blocks": decision.total_blocks,
            "prefix_router.worker": decision.worker,
            "prefix_router.load": load,
            "prefix_router.tenant_group": tenant_group,
        }
        if decision.cap is not None:
            attributes["prefix_router.cap"] = decision.cap
        if decision.affinity_worker is not None:
            attributes["prefix_router.affinity_worker"] = decision.affinity_worker
        span.set(attributes)
    span.end()


def start_upstream(
    exchange: Exchange, worker_id: str, worker_url: str, path: str
) -> TraceSpan | None:
    if exchange.trace is None:
        return None
    return exchange.trace.child(
        UPSTREAM,
        client=True,
        attributes={
            "http.request.method": "POST",
            "url.full": worker_url + path,
            "prefix_router.worker": worker_id,
            "prefix_router.attempt": exchange.attempts,
        },
    )


def end_upstream(exchange: Exchange, span: TraceSpan) -> None:
    if exchange.upstream_status is not None:
        span.set({"http.response.status_code": exchange.upstream_status})
        if exchange.upstream_status >= 500:
            span.fail(f"HTTP {exchange.upstream_status}")
    if exchange.error is not None:
        span.fail(exchange.error)
    span.end()
