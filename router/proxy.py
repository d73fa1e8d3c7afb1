"""Forwarding one inference request: attempts, retries, SSE passthrough, usage capture.

An attempt sends the body to the chosen worker and waits for its response headers and, for a
stream, its first chunk. Anything that goes wrong until then (connect error, timeout, 5xx, a
connection dropped mid-body) is retried on another worker, up to ``max_attempts``: the client
has seen nothing yet. Once the first byte went out, a failing worker ends the stream with an
OpenAI-style error event instead.

Streams pass through chunk by chunk as they arrive (never buffered); the router only splits
events that mention ``"usage"``, to read the usage report and, when the router itself asked
for it, to drop it again so the client gets exactly what it asked for.

With tracing on, each attempt makes a route-decision span and an upstream span (see
`router.spans`), and the worker receives the upstream span's context as ``traceparent``.
With tracing off, the client's ``traceparent`` passes through unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import aiohttp
import msgspec
from aiohttp import web

from router import spans
from router.core.model import Decision, RouteRequest
from router.errors import RouterError, UpstreamError, UpstreamTimeout, error_body
from router.insights import InsightTicket
from router.parse import ParsedRequest, decode, encode
from router.routing import Router, Usage
from router.telemetry import Metrics, TraceSpan
from router.upstream import Upstream
from router.workers import Worker

log = logging.getLogger("prefix_router.proxy")

_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class RetryableFailure(UpstreamError):
    """This attempt failed before anything reached the client; another worker may try."""

    def __init__(self, message: str, kind: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.timeout = timeout


@dataclass(slots=True)
class Exchange:
    """What one request did, for metrics and the access log."""

    request_id: str
    endpoint: str
    route: str
    stream: bool
    started: float
    tenant: str = ""
    prefix_version: str = ""
    decision: Decision | None = None
    worker: str | None = None
    attempts: int = 0
    status: int = 0
    usage: Usage | None = None
    ttft: float | None = None
    error: str | None = None
    retried_from: list[str] = field(default_factory=list)
    trace: TraceSpan | None = None
    """The request's server span (tracing on)."""
    trace_id: str | None = None
    """For the access log: our trace's id, or the client's when tracing is off."""
    upstream_status: int | None = None
    """HTTP status of the current attempt's worker response."""
    insight: InsightTicket | None = None
    """The insights recorder's ticket (route, tenant group, whether the shape is sampled)."""


def decision_header(decision: Decision, policy: str, load: int) -> str:
    cap = "-" if decision.cap is None else str(decision.cap)
    return (
        f"{decision.reason}; policy={policy}; matched={decision.matched_blocks}; "
        f"best={decision.best_available_blocks}; blocks={decision.total_blocks}; "
        f"load={load}; cap={cap}"
    )


def parse_usage(usage: Any) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    if not _is_count(prompt):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    completion = usage.get("completion_tokens")
    return Usage(
        prompt_tokens=prompt,
        cached_tokens=min(cached, prompt) if _is_count(cached) else None,
        completion_tokens=completion if _is_count(completion) else 0,
    )


class _UsageOnly(msgspec.Struct):
    """A completion as far as the router reads it: msgspec skips every other member without
    building it (the choices' text is most of the body)."""

    usage: Any = None


_usage_decoder: msgspec.json.Decoder[_UsageOnly] = msgspec.json.Decoder(_UsageOnly)


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _json_response(
    raw: bytes, upstream: aiohttp.ClientResponse, extra: dict[str, str]
) -> web.Response:
    content_type = upstream.headers.get("Content-Type", "application/json")
    return web.Response(
        body=raw, status=upstream.status, headers={**extra, "Content-Type": content_type}
    )


def _event_end(data: bytes, start: int) -> tuple[int, int]:
    """Where the next SSE event ends (a blank line, LF or CRLF) and the separator's width."""
    lf = data.find(b"\n\n", start)
    crlf = data.find(b"\r\n\r\n", start)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, 4
    return lf, 2


class SseUsageFilter:
    """Splits an SSE byte stream into events only where needed, to read (and maybe drop) usage.

    Chunks that hold whole events and no ``"usage"`` pass through untouched, which is the
    common case; others are cut at event boundaries and the usage-bearing events inspected.
    """

    def __init__(self, strip_usage: bool) -> None:
        self._strip = strip_usage
        self._pending = b""
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        if not self._pending and b'"usage"' not in chunk and chunk.endswith(b"\n\n"):
            return chunk
        data = self._pending + chunk
        out: list[bytes] = []
        start = 0
        while True:
            end, width = _event_end(data, start)
            if end < 0:
                break
            event = data[start : end + width]
            start = end + width
            out.append(self._inspect(event) if b'"usage"' in event else event)
        self._pending = data[start:]
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    def _inspect(self, event: bytes) -> bytes:
        line = event.strip()
        if not line.startswith(b"data:"):
            return event
        try:
            payload = decode(line[5:].strip())
        except Exception:
            return event
        if not isinstance(payload, dict) or "usage" not in payload:
            return event
        usage = parse_usage(payload.get("usage"))
        if usage is not None:
            self.usage = usage
        if not self._strip:
            return event
        if payload.get("choices") == [] and usage is not None:
            return b""
        del payload["usage"]
        return b"data: " + encode(payload) + b"\n\n"


class Forwarder:
    """Runs the attempts of one request against the pool, and the stream if there is one."""

    def __init__(self, router: Router, upstream: Upstream, metrics: Metrics, *, headers_on: bool):
        self.router = router
        self.upstream = upstream
        self.metrics = metrics
        self.headers_on = headers_on
        self.max_attempts = router.settings.upstream.max_attempts
        self.total_timeout = router.settings.upstream.total_timeout_s

    async def forward(
        self,
        request: web.Request,
        exchange: Exchange,
        parsed: ParsedRequest,
        route_request: RouteRequest,
        path: str,
        body: bytes,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        pool = self.router.pool
        tried: list[str] = []
        last_error: RouterError | None = None
        for attempt in range(self.max_attempts):
            try:
                decision, worker, load = await self._decide(exchange, route_request, tried)
            except RouterError:
                if last_error is not None:
                    raise last_error from None
                raise
            exchange.attempts = attempt + 1
            exchange.decision = decision
            exchange.worker = worker.id
            exchange.upstream_status = None
            extra = self._decision_headers(decision, worker, exchange.request_id, load)
            span = spans.start_upstream(exchange, worker.id, worker.url, path)
            sent_headers = headers if span is None else {**headers, **span.propagation_headers()}
            self.router.acquire(worker)
            gauge = self.metrics.child(self.metrics.inflight, worker.id)
            gauge.inc()
            try:
                if parsed.stream:
                    return await self._attempt_stream(
                        request, exchange, worker, route_request, decision, path, body,
                        sent_headers, extra, strip_usage=not parsed.client_wants_usage,
                    )  # fmt: skip
                return await self._attempt_plain(
                    exchange, worker, route_request, decision, path, body, sent_headers, extra
                )
            except RetryableFailure as exc:
                if span is not None:
                    span.set({"error.type": exc.kind})
                    span.fail(exc.message)
                pool.report_failure(worker, exc.message)
                self._count_error(worker, exc.kind)
                await self.router.forget_prediction(worker, route_request, decision)
                tried.append(worker.id)
                exchange.retried_from.append(worker.id)
                last_error = (
                    UpstreamTimeout(exc.message) if exc.timeout else UpstreamError(exc.message)
                )
                if attempt + 1 < self.max_attempts:
                    self.metrics.retries.labels(exchange.route).inc()
                log.info(
                    "attempt failed",
                    extra={"fields": {"request_id": exchange.request_id, "worker": worker.id,
                                      "attempt": attempt + 1, "error": exc.message}},
                )  # fmt: skip
            finally:
                self.router.release(worker)
                gauge.dec()
                if span is not None:
                    spans.end_upstream(exchange, span)
        assert last_error is not None
        raise last_error

    async def _decide(
        self, exchange: Exchange, route_request: RouteRequest, tried: list[str]
    ) -> tuple[Decision, Worker, int]:
        """`Router.decide`, inside a route-decision span when tracing is on."""
        span = spans.start_route(exchange, len(tried) + 1)
        try:
            decision, worker, load = await self.router.decide(route_request, exclude=tried)
        except RouterError as exc:
            if span is not None:
                span.fail(exc.message)
                span.end()
            raise
        if span is not None:
            tenant_group = self.metrics.tenant_label(exchange.tenant)
            spans.end_route(
                span, decision, policy=self.router.policy.name, load=load, tenant_group=tenant_group
            )
        return decision, worker, load

    def _count_error(self, worker: Worker, kind: str) -> None:
        # A worker that left the pool has no series any more; do not bring them back.
        if not worker.removed:
            self.metrics.upstream_errors.labels(worker.id, kind).inc()

    def _decision_headers(
        self, decision: Decision, worker: Worker, request_id: str, load: int
    ) -> dict[str, str]:
        headers = {"x-request-id": request_id}
        if self.headers_on:
            headers["x-prefix-router-worker"] = worker.id
            headers["x-prefix-router-decision"] = decision_header(
                decision, self.router.policy.name, load
            )
        return headers

    async def _open(
        self, worker: Worker, path: str, body: bytes, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        started = time.perf_counter()
        try:
            response = await self.upstream.send(worker, path, body, headers)
        except UpstreamTimeout as exc:
            raise RetryableFailure(exc.message, "timeout", timeout=True) from exc
        except UpstreamError as exc:
            raise RetryableFailure(exc.message, "connect") from exc
        if not worker.removed:
            metrics = self.metrics
            metrics.child(metrics.upstream_seconds, worker.id).observe(
                time.perf_counter() - started
            )
        return response

    async def _read_all(self, worker: Worker, response: aiohttp.ClientResponse) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = await self._read_or_retry(
                worker, response, "dropped the connection mid-response"
            )
            if not chunk:
                break
            size += len(chunk)
            if size > _MAX_RESPONSE_BYTES:
                raise RetryableFailure(f"worker {worker.id}: response too large", "too_large")
            parts.append(chunk)
        return b"".join(parts)

    async def _read_or_retry(
        self, worker: Worker, response: aiohttp.ClientResponse, lost: str
    ) -> bytes:
        """Next chunk, before anything reached the client: a failure is a `RetryableFailure`."""
        try:
            return await self.upstream.read_chunk(response)
        except UpstreamTimeout as exc:
            raise RetryableFailure(
                f"worker {worker.id}: {exc.message}", "timeout", timeout=True
            ) from exc
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise RetryableFailure(f"worker {worker.id} {lost}: {exc}", "reset") from exc

    async def _non_success(
        self, exchange: Exchange, worker: Worker, response: aiohttp.ClientResponse,
        raw: bytes, extra: dict[str, str],
    ) -> web.Response:  # fmt: skip
        """A worker's own error: 5xx is retried elsewhere; 4xx is the client's and passes on."""
        if response.status >= 500:
            snippet = raw[:200].decode(errors="replace")
            raise RetryableFailure(
                f"worker {worker.id} answered HTTP {response.status}: {snippet}", "status_5xx"
            )
        self.router.pool.report_success(worker)
        exchange.status = response.status
        return _json_response(raw, response, extra)

    async def _attempt_plain(
        self, exchange: Exchange, worker: Worker, route_request: RouteRequest,
        decision: Decision, path: str, body: bytes, headers: dict[str, str],
        extra: dict[str, str],
    ) -> web.Response:  # fmt: skip
        response = await self._open(worker, path, body, headers)
        exchange.upstream_status = response.status
        try:
            raw = await self._read_all(worker, response)
        finally:
            response.release()
        if response.status != 200:
            await self.router.forget_prediction(worker, route_request, decision)
            return await self._non_success(exchange, worker, response, raw, extra)
        self.router.pool.report_success(worker)
        usage = None
        if b'"usage"' in raw:
            try:
                usage = parse_usage(_usage_decoder.decode(raw).usage)
            except Exception:  # a worker's malformed body costs the usage, never the request
                usage = None
        exchange.usage = usage
        exchange.status = 200
        await self.router.learn(worker, route_request, decision, usage)
        return _json_response(raw, response, extra)

    async def _attempt_stream(
        self, request: web.Request, exchange: Exchange, worker: Worker,
        route_request: RouteRequest, decision: Decision, path: str, body: bytes,
        headers: dict[str, str], extra: dict[str, str], *, strip_usage: bool,
    ) -> web.StreamResponse:  # fmt: skip
        response = await self._open(worker, path, body, headers)
        exchange.upstream_status = response.status
        complete = False
        try:
            if response.status != 200:
                raw = await self._read_all(worker, response)
                complete = True
                await self.router.forget_prediction(worker, route_request, decision)
                return await self._non_success(exchange, worker, response, raw, extra)
            first = await self._read_or_retry(
                worker, response, "dropped the stream before its first byte"
            )
            if not first:
                raise RetryableFailure(f"worker {worker.id} sent an empty stream", "reset")
            exchange.ttft = time.perf_counter() - exchange.started
            self.metrics.ttft.labels(exchange.route).observe(exchange.ttft)
            client = web.StreamResponse(status=200, headers={**_SSE_HEADERS, **extra})
            await client.prepare(request)
            exchange.status = 200
            sse = SseUsageFilter(strip_usage)
            complete = await self._pump(exchange, worker, response, client, sse, first)
            exchange.usage = sse.usage
            if complete:
                self.router.pool.report_success(worker)
                await self.router.learn(worker, route_request, decision, sse.usage)
            return client
        finally:
            if complete:
                response.release()
            else:
                response.close()

    async def _pump(
        self, exchange: Exchange, worker: Worker, response: aiohttp.ClientResponse,
        client: web.StreamResponse, sse: SseUsageFilter, first: bytes,
    ) -> bool:  # fmt: skip
        """Copy the stream to the client. True when the worker finished it cleanly."""
        itl = self.metrics.inter_token.labels(exchange.route)
        deadline = exchange.started + self.total_timeout
        try:
            out = sse.feed(first)
            if out:
                await client.write(out)
            last = time.perf_counter()
            while True:
                if time.perf_counter() > deadline:
                    raise UpstreamTimeout(f"stream exceeded {self.total_timeout:g}s")
                chunk = await self.upstream.read_chunk(response)
                if not chunk:
                    break
                now = time.perf_counter()
                itl.observe(now - last)
                last = now
                out = sse.feed(chunk)
                if out:
                    await client.write(out)
            tail = sse.flush()
            if tail:
                await client.write(tail)
            await client.write_eof()
            return True
        except ConnectionResetError:
            exchange.error = "client disconnected"
            return False
        except asyncio.CancelledError:
            # A shutdown past its grace: say why the stream ends rather than just dropping it.
            exchange.error = "stream cut: the router is shutting down"
            event = error_body(exchange.error, "service_unavailable", "shutting_down")
            with contextlib.suppress(Exception):
                async with asyncio.timeout(0.5):
                    await client.write(b"data: " + encode(event) + b"\n\ndata: [DONE]\n\n")
                    await client.write_eof()
            raise
        except (UpstreamError, aiohttp.ClientError, ConnectionError) as exc:
            message = exc.message if isinstance(exc, UpstreamError) else f"{type(exc).__name__}"
            exchange.error = f"worker {worker.id} failed mid-stream: {message}"
            self.router.pool.report_failure(worker, exchange.error)
            self.metrics.stream_errors.labels(exchange.route).inc()
            self._count_error(worker, "mid_stream")
            event = error_body(exchange.error, "upstream_error", 502)
            try:
                await client.write(b"data: " + encode(event) + b"\n\ndata: [DONE]\n\n")
                await client.write_eof()
            except ConnectionResetError:
                pass
            return False
