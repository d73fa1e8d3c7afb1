"""Cache-aware routing against real simulated workers: affinity, isolation, bounded load."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import httpx

from tests.integration.conftest import (
    RouterFactory,
    SimFactory,
    apoll,
    chat_body,
    settings_for,
)

HEAD = " ".join(f"rule-{i}: answer politely and cite section {i * 7 % 13}." for i in range(60))


def _keys(*tenants: str) -> dict[str, object]:
    return {"api_keys": [{"key": f"sk-{t}", "tenant": t} for t in tenants]}


def _auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer sk-{tenant}"}


def _decision(response: httpx.Response) -> dict[str, str]:
    reason, *fields = response.headers["x-prefix-router-decision"].split("; ")
    parsed = dict(f.split("=", 1) for f in fields)
    parsed["reason"] = reason
    return parsed


async def test_same_prefix_goes_to_same_worker_and_hits_cache(
    sims: SimFactory, router: RouterFactory
) -> None:
    """Two requests of one tenant sharing a long prefix land on one worker; the second hits."""
    workers = sims(4)
    running = await router(settings_for(workers, tenants={**_keys("acme")}))
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
        first = await client.post(
            "/v1/chat/completions", json=chat_body(HEAD, "What is rule 3?"), headers=_auth("acme")
        )
        second = await client.post(
            "/v1/chat/completions", json=chat_body(HEAD, "And rule 9?"), headers=_auth("acme")
        )
    assert first.status_code == second.status_code == 200
    assert first.headers["x-prefix-router-worker"] == second.headers["x-prefix-router-worker"]
    assert _decision(second)["reason"] == "warm"
    assert first.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 400


async def test_tenants_never_share_cached_prefixes(sims: SimFactory, router: RouterFactory) -> None:
    """On one worker, a second tenant sending identical text gets zero cached tokens."""
    workers = sims(1)
    running = await router(settings_for(workers, tenants={**_keys("alpha", "beta")}))
    body = chat_body(HEAD, "same question")
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
        alpha = await client.post("/v1/chat/completions", json=body, headers=_auth("alpha"))
        beta = await client.post("/v1/chat/completions", json=body, headers=_auth("beta"))
        alpha_again = await client.post("/v1/chat/completions", json=body, headers=_auth("alpha"))
    cached = [r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] for r in (alpha, beta)]
    assert cached == [0, 0]
    assert alpha_again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 400
    salts = {r["cache_salt"] for r in workers[0].requests()}
    assert len(salts) == 2
    assert None not in salts


async def test_client_cache_salt_is_replaced(sims: SimFactory, router: RouterFactory) -> None:
    """A client that sends another tenant's salt still gets its own: no cross-tenant hits."""
    workers = sims(1)
    running = await router(settings_for(workers, tenants={**_keys("alpha", "mallory")}))
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
        await client.post("/v1/chat/completions", json=chat_body(HEAD, "q"), headers=_auth("alpha"))
        alpha_salt = workers[0].requests(1)[-1]["cache_salt"]
        forged = chat_body(HEAD, "q", cache_salt=alpha_salt)
        stolen = await client.post("/v1/chat/completions", json=forged, headers=_auth("mallory"))
    assert stolen.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert workers[0].requests(1)[-1]["cache_salt"] != alpha_salt


async def test_hot_tenant_spills_under_the_cap(sims: SimFactory, router: RouterFactory) -> None:
    """A hot prefix at high concurrency never pushes a worker past the bounded-load cap and
    spreads to ring neighbours instead of queueing on one worker."""
    workers = sims(4, decode_ms_per_token=5, max_running=64)
    running = await router(settings_for(workers, tenants={**_keys("hot")}))
    rng = random.Random(7)

    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        body = chat_body(HEAD, f"question {i} {rng.random()}", max_tokens=20)
        return await client.post("/v1/chat/completions", json=body, headers=_auth("hot"))

    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=running.url, timeout=30, limits=limits) as client:
        await one(client, -1)  # warm one worker first
        responses = await asyncio.gather(*(one(client, i) for i in range(160)))
    assert all(r.status_code == 200 for r in responses)
    decisions = [_decision(r) for r in responses]
    for d in decisions:
        assert int(d["load"]) + 1 <= int(d["cap"]), d
    per_worker = Counter(r.headers["x-prefix-router-worker"] for r in responses)
    assert len(per_worker) >= 3, per_worker
    assert sum(1 for d in decisions if d["reason"] == "spill") > 0
    # The spilled traffic warms the neighbours too: most requests still hit the cache.
    hits = sum(1 for r in responses if r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert hits / len(responses) > 0.9


async def test_round_robin_scatters_and_cache_aware_does_not(
    sims: SimFactory, router: RouterFactory
) -> None:
    """Over the same traffic, cache_aware keeps each tenant on one worker; round robin scatters."""
    workers = sims(3)
    tenants = [f"t{i}" for i in range(5)]  # coprime with 3 workers, so round robin rotates
    spread: dict[str, dict[str, set[str]]] = {}
    for policy in ("round_robin", "cache_aware"):
        running = await router(
            settings_for(workers, tenants={**_keys(*tenants)}, routing={"policy": policy})
        )
        seen: dict[str, set[str]] = {t: set() for t in tenants}
        async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
            for turn in range(4):
                for tenant in tenants:
                    body = chat_body(f"{tenant} " + HEAD, f"turn {turn}")
                    r = await client.post("/v1/chat/completions", json=body, headers=_auth(tenant))
                    assert r.status_code == 200
                    seen[tenant].add(r.headers["x-prefix-router-worker"])
        spread[policy] = seen
    assert all(len(w) == 1 for w in spread["cache_aware"].values())
    assert any(len(w) > 1 for w in spread["round_robin"].values())


async def test_with_kv_events_responses_do_not_confirm_chains(
    sims: SimFactory, router: RouterFactory
) -> None:
    """With KV-event sidecars feeding the index, a response leaves only a short-lived
    prediction: once it expires, nothing the router wrote credits the worker."""
    workers = sims(2)
    settings = settings_for(workers, index={"kv_events": True, "predicted_ttl_s": 0.2})
    running = await router(settings)
    body = chat_body(HEAD, "q")
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
        first = await client.post("/v1/chat/completions", json=body)
        assert first.status_code == 200
        second = await client.post("/v1/chat/completions", json=body)
        assert _decision(second)["reason"] == "warm"  # the prediction still holds

        async def expired() -> bool:
            dry = await client.post("/admin/route", json=body, headers=running.admin_headers())
            return bool(dry.json()["decision"]["best_available_blocks"] == 0)

        await apoll(expired, within=10)
