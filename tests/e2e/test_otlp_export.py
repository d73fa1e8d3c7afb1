"""Tracing as an operator turns it on: `prefix-router serve` with OTEL_* variables exports
its spans over OTLP/HTTP to a collector (here a small stand-in on 127.0.0.1), flushing them on
SIGTERM; the worker and the access log see the same trace."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from load_tests.procs import start

trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")

BIN = Path(sys.executable).parent
CLIENT_TRACE = "5b8efff798038103d269b633813fc60c"
TRACEPARENT = f"00-{CLIENT_TRACE}-eee19b7ec3c1b174-01"


def _attributes(span: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in span.attributes:
        kind = item.value.WhichOneof("value")
        values[item.key] = getattr(item.value, kind) if kind else None
    return values


async def test_spans_reach_an_otlp_collector_named_by_otel_variables(tmp_path: Path) -> None:
    """With OTEL_EXPORTER_OTLP_ENDPOINT set, the route-decision and upstream spans arrive at
    the collector in the client's trace, under OTEL_SERVICE_NAME, by the time the router
    exits."""
    bodies: list[bytes] = []

    async def collect(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")

    collector_app = web.Application()
    collector_app.router.add_post("/v1/traces", collect)
    collector = TestServer(collector_app, host="127.0.0.1", port=0)
    await collector.start_server()
    sim = start("sim", [str(BIN / "prefix-worker"), "sim", "--port", "0", "--worker-id", "w0"],
                log_path=tmp_path / "sim.log")  # fmt: skip
    try:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": str(collector.make_url("")).rstrip("/"),
            "OTEL_SERVICE_NAME": "router-e2e",
        }
        argv = [str(BIN / "prefix-router"), "serve", "--worker", sim.url, "--port", "0"]
        router = start("router", argv, log_path=tmp_path / "router.log", env=env)
        try:
            body = {"model": "sim-model", "prompt": "hello " * 100, "max_tokens": 2}
            async with httpx.AsyncClient(timeout=10) as client:
                answer = await client.post(router.url + "/v1/completions", json=body,
                                           headers={"traceparent": TRACEPARENT})  # fmt: skip
                assert answer.status_code == 200
                received = (await client.get(sim.url + "/sim/requests?limit=1")).json()
            router.popen.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(router.popen.wait, 20) == 0
        finally:
            router.stop()
    finally:
        sim.stop()
        await collector.close()

    spans: dict[str, Any] = {}
    service_names = set()
    for raw in bodies:
        export = trace_service.ExportTraceServiceRequest.FromString(raw)
        for resource_spans in export.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            service_names.add(resource.get("service.name"))
            for scope in resource_spans.scope_spans:
                spans.update({span.name: span for span in scope.spans})
    assert service_names == {"router-e2e"}
    assert {"POST /v1/completions", "prefix_router.route", "prefix_router.upstream"} <= set(spans)
    assert {spans[name].trace_id.hex() for name in spans} == {CLIENT_TRACE}
    route = _attributes(spans["prefix_router.route"])
    assert route["prefix_router.worker"] == "127.0.0.1:" + sim.url.rsplit(":", 1)[1]
    assert route["prefix_router.total_blocks"] > 0
    records = received["requests"] if isinstance(received, dict) else received
    upstream_id = spans["prefix_router.upstream"].span_id.hex()
    assert records[-1]["headers"]["traceparent"].split("-")[1:3] == [CLIENT_TRACE, upstream_id]
    lines = [json.loads(x) for x in (tmp_path / "router.log").read_text().splitlines()]
    [access] = [x for x in lines if x["msg"] == "request"]
    assert access["trace_id"] == CLIENT_TRACE
    [started] = [x for x in lines if x["msg"] == "router started"]
    assert started["tracing"].startswith("otlp http/protobuf")
