"""The HTTP surface as a client and an operator see it: errors, admin, health, metrics."""

from __future__ import annotations

import httpx
import pytest

from router.config import Settings
from tests.integration.conftest import (
    RouterFactory,
    SimFactory,
    apoll,
    chat_body,
    metric_value,
    settings_for,
)

HEAD = "Shared instructions for every request of this tenant. " * 30
KEYS = {"api_keys": [{"key": "sk-good", "tenant": "good"}]}
AUTH = {"Authorization": "Bearer sk-good"}


@pytest.mark.parametrize(
    ("content", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"model": "sim-model"}', 400, "'messages' is required"),
        (b'{"model": 7, "messages": [{"role": "user", "content": "x"}]}', 400, "'model'"),
        (b'{"messages": []}', 400, "non-empty"),
        (b'{"messages": [{"content": "x"}]}', 400, "role"),
        (b'{"messages": [{"role": "user", "content": 5}]}', 400, "content"),
        (b'{"messages": [{"role": "user"}], "stream": "yes"}', 400, "'stream'"),
        (b'{"messages": [{"role": "user"}], "max_tokens": -1}', 400, "max_tokens"),
        (b"[" * 100_000 + b"]" * 100_000, 400, ""),
    ],
)
async def test_bad_bodies_get_openai_errors(
    router: RouterFactory, content: bytes, status: int, fragment: str
) -> None:
    """Malformed JSON, wrong types and missing fields get a 400 with an OpenAI error body."""
    # Validation happens before routing: a worker that is never reached is enough.
    unreachable = Settings.model_validate(
        {"workers": [{"url": "http://127.0.0.1:9"}], "tenants": KEYS}
    )
    running = await router(unreachable)
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
        response = await client.post("/v1/chat/completions", content=content, headers=AUTH)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"]


async def test_auth_size_and_route_errors(sims: SimFactory, router: RouterFactory) -> None:
    """Unknown key 401, missing key 401, oversized body 413, unknown route 404, wrong verb 405."""
    workers = sims(1)
    settings = settings_for(workers, tenants=KEYS, server={"max_body_bytes": 4096})
    running = await router(settings)
    body = chat_body(HEAD, "q")
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
        unknown = await client.post(
            "/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}
        )
        missing = await client.post("/v1/chat/completions", json=body)
        big = await client.post(
            "/v1/chat/completions", json=chat_body("x" * 10_000, "q"), headers=AUTH
        )
        nowhere = await client.post("/v1/embeddings", json=body, headers=AUTH)
        verb = await client.get("/v1/chat/completions", headers=AUTH)
        ok = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (401, "invalid_api_key")
    assert missing.status_code == 401
    assert "Authorization" in missing.json()["error"]["message"]
    assert (big.status_code, big.json()["error"]["code"]) == (413, "request_too_large")
    assert nowhere.status_code == 404
    assert nowhere.json()["error"]["type"] == "not_found_error"
    assert verb.status_code == 405
    assert ok.status_code == 200


async def test_worker_validation_errors_pass_through(
    sims: SimFactory, router: RouterFactory
) -> None:
    """A 400 from the worker (unknown model) reaches the client as is, and is not retried."""
    workers = sims(2)
    running = await router(settings_for(workers))
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
        response = await client.post(
            "/v1/chat/completions", json={**chat_body(HEAD, "q"), "model": "no-such-model"}
        )
    assert response.status_code == 404
    assert "no-such-model" in response.text
    assert sum(w.requests_total for w in running.state.pool.members()) == 1


async def test_completions_and_models(sims: SimFactory, router: RouterFactory) -> None:
    """/v1/completions routes by prompt (text and token ids) and /v1/models lists the model."""
    workers = sims(2)
    running = await router(settings_for(workers))
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
        text = {"model": "sim-model", "prompt": HEAD + " complete this", "max_tokens": 3}
        first = await client.post("/v1/completions", json=text)
        second = await client.post("/v1/completions", json=text)
        tokens = await client.post(
            "/v1/completions", json={"model": "sim-model", "prompt": list(range(200))}
        )
        models = await client.get("/v1/models")
    assert first.status_code == second.status_code == tokens.status_code == 200
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert first.headers["x-prefix-router-worker"] == second.headers["x-prefix-router-worker"]
    assert models.json()["data"][0]["id"] == "sim-model"


async def test_admin_api(sims: SimFactory, router: RouterFactory) -> None:
    """The admin API needs its token, explains decisions, and retunes thresholds live."""
    workers = sims(3)
    running = await router(settings_for(workers))
    admin = running.admin_headers()
    body = chat_body(HEAD, "q")
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
        assert (await client.get("/admin/workers")).status_code == 401
        await client.post("/v1/chat/completions", json=body)
        dry = (await client.post("/admin/route", json=body, headers=admin)).json()
        assert dry["decision"]["reason"] == "warm"
        assert "longest warm prefix" in dry["explanation"]
        assert len(dry["candidates"]) == 3
        put = await client.put("/admin/config", json={"min_match_blocks": 10_000}, headers=admin)
        assert put.status_code == 200
        assert put.json()["tuning"]["min_match_blocks"] == 10_000
        live = await client.post("/v1/chat/completions", json=body)
        assert live.headers["x-prefix-router-decision"].startswith("affinity")
        bad = await client.put("/admin/config", json={"load_factor": 0.2}, headers=admin)
        assert bad.status_code == 400
        assert "load_factor" in bad.json()["error"]["message"]
        config = (await client.get("/admin/config", headers=admin)).json()
        assert config["tuning"]["load_factor"] == 1.25
        assert "integration-secret" not in str(config)
        removed = await client.delete("/admin/workers/w2", headers=admin)
        assert removed.status_code == 200
        listing = (await client.get("/admin/workers", headers=admin)).json()["workers"]
        assert [w["id"] for w in listing] == ["w0", "w1"]


async def test_admin_api_off_without_token(sims: SimFactory, router: RouterFactory) -> None:
    """With no admin token configured the admin routes do not exist."""
    workers = sims(1)
    running = await router(settings_for(workers, server={"admin_token": None}))
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
        response = await client.get("/admin/workers", headers={"Authorization": "Bearer x"})
    assert response.status_code == 404


async def test_health_ready_and_metrics(sims: SimFactory, router: RouterFactory) -> None:
    """/health and /ready answer, and /metrics counts cached tokens and decisions."""
    workers = sims(2)
    running = await router(settings_for(workers))
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/ready")).json()["ready"] is True
        for _ in range(3):
            await client.post("/v1/chat/completions", json=chat_body(HEAD, "q"))
        text = (await client.get("/metrics")).text
    assert metric_value(text, "prefix_router_cached_tokens_total") > 0
    assert metric_value(text, "prefix_router_decisions_total", reason="warm") == 2
    assert metric_value(text, "prefix_router_requests_total", status="200") == 3
    assert metric_value(text, "prefix_router_worker_healthy") == 2


async def test_index_mirrors_the_workers_cache_size(
    sims: SimFactory, router: RouterFactory
) -> None:
    """Once a worker's /metrics report its KV cache size, the index remembers no more than
    that for it, and /admin/workers shows what the engine reports."""
    workers = sims(1, cache_blocks=64, block_size=16)
    running = await router(settings_for(workers, health={"scrape_interval_s": 0.2}))
    admin = running.admin_headers()
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:

        async def scraped() -> bool:
            listing = (await client.get("/admin/workers", headers=admin)).json()["workers"]
            return listing[0]["engine"] is not None

        await apoll(scraped, within=10)
        for i in range(12):  # 12 distinct prompts of ~20 blocks: far more than 64 blocks
            body = chat_body(f"tenant text {i} " + HEAD[: 64 * 20], "q", max_tokens=1)
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        listing = (await client.get("/admin/workers", headers=admin)).json()["workers"]
    engine = listing[0]["engine"]
    assert (engine["num_gpu_blocks"], engine["block_size"]) == (64, 16)
    # 64 blocks of 16 tokens, about 4 characters per token: 64 index blocks of 64 characters.
    assert 0 < listing[0]["index_blocks"] <= 64
