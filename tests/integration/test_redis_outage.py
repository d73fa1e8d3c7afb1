"""Redis going away under load costs no request: routing falls back to the ring and resumes."""

from __future__ import annotations

import httpx

from load_tests.redis_server import RedisServer
from tests.integration.conftest import (
    RouterFactory,
    SimFactory,
    apoll,
    chat_body,
    metric_value,
    settings_for,
)

HEAD = "Handbook for the claims team: how to assess, document and settle a claim. " * 25


async def test_redis_restart_mid_run_fails_no_request(
    sims: SimFactory, router: RouterFactory, redis_server: RedisServer
) -> None:
    """Stopping Redis mid-run fails nothing, is counted in /metrics, and index routing resumes
    once Redis is back."""
    workers = sims(3)
    shared = {
        "index": {"kind": "redis"},
        "loads": {"kind": "redis"},
        "redis": {"url": redis_server.url, "op_timeout_s": 0.2},
    }
    running = await router(settings_for(workers, **shared))
    statuses: list[int] = []

    async def traffic(client: httpx.AsyncClient, start: int, count: int) -> None:
        for i in range(start, start + count):
            body = chat_body(f"tenant {i % 5} " + HEAD, f"question {i}")
            statuses.append((await client.post("/v1/chat/completions", json=body)).status_code)

    async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
        await traffic(client, 0, 10)
        warm = await client.post("/v1/chat/completions", json=chat_body("tenant 0 " + HEAD, "x"))
        assert warm.headers["x-prefix-router-decision"].startswith("warm")

        redis_server.stop()
        await traffic(client, 10, 20)
        text = (await client.get("/metrics")).text
        assert metric_value(text, "prefix_router_index_errors_total") > 0
        assert metric_value(text, "prefix_router_backend_up", backend="index") == 0

        redis_server.start()  # same port, empty: a restart as operators see it

        async def index_back() -> bool:
            text = (await client.get("/metrics")).text
            return metric_value(text, "prefix_router_backend_up", backend="index") == 1

        await apoll(index_back, within=20)
        await traffic(client, 30, 10)
        again = await client.post("/v1/chat/completions", json=chat_body("tenant 0 " + HEAD, "y"))
        assert again.headers["x-prefix-router-decision"].startswith("warm")
    assert statuses == [200] * 40
