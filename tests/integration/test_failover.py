"""Workers failing under load: retries before the first byte, ejection, and coming back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from router.core.model import WorkerId
from tests.integration.conftest import (
    RouterFactory,
    SimFactory,
    apoll,
    chat_body,
    restart_sim,
    set_fault,
    settings_for,
)

HEAD = "Company policy handbook, section on refunds and returns. " * 30


async def _worker_state(client: httpx.AsyncClient, headers: dict[str, str], worker: str) -> str:
    listing = (await client.get("/admin/workers", headers=headers)).json()["workers"]
    return next(str(w["state"]) for w in listing if w["id"] == worker)


async def test_worker_killed_mid_load_loses_no_request(
    sims: SimFactory, router: RouterFactory, tmp_path: Path
) -> None:
    """Killing a worker under load fails no non-streaming request; it is ejected, then comes
    back once it is healthy again."""
    workers = sims(3, decode_ms_per_token=10)
    running = await router(settings_for(workers))
    victim = workers[1]
    statuses: list[int] = []

    async def tenant_traffic(client: httpx.AsyncClient, i: int) -> None:
        body = chat_body(f"tenant {i % 6} " + HEAD, f"question {i}", max_tokens=30)
        response = await client.post("/v1/chat/completions", json=body)
        statuses.append(response.status_code)

    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=running.url, timeout=30, limits=limits) as client:
        wave = [asyncio.create_task(tenant_traffic(client, i)) for i in range(60)]
        victim_state = running.state.pool.get(WorkerId(victim.worker_id))
        assert victim_state is not None

        async def victim_busy() -> bool:
            return victim_state.inflight > 0

        await apoll(victim_busy, within=10)
        victim.process.kill()
        wave += [asyncio.create_task(tenant_traffic(client, i)) for i in range(60, 120)]
        await asyncio.gather(*wave)
        assert statuses.count(200) == 120, statuses

        headers = running.admin_headers()

        async def ejected() -> bool:
            return await _worker_state(client, headers, victim.worker_id) != "healthy"

        await apoll(ejected, within=10)
        restart_sim(victim, tmp_path)

        async def back() -> bool:
            return await _worker_state(client, headers, victim.worker_id) == "healthy"

        await apoll(back, within=20)
        after = [
            await client.post(
                "/v1/chat/completions", json=chat_body(f"tenant {i} " + HEAD, "again")
            )
            for i in range(12)
        ]
    assert all(r.status_code == 200 for r in after)
    assert victim.worker_id in {r.headers["x-prefix-router-worker"] for r in after}


async def test_errors_are_retried_on_another_worker(
    sims: SimFactory, router: RouterFactory
) -> None:
    """A worker answering 500 costs the client nothing: the router retries elsewhere."""
    workers = sims(2)
    running = await router(settings_for(workers, health={"failures_to_eject": 100}))
    await set_fault(workers[0], mode="error", status=500)
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
        responses = [
            await client.post("/v1/chat/completions", json=chat_body(f"t{i} " + HEAD, "q"))
            for i in range(10)
        ]
    assert [r.status_code for r in responses] == [200] * 10
    assert {r.headers["x-prefix-router-worker"] for r in responses} == {"w1"}


async def test_hung_worker_times_out_and_is_retried(
    sims: SimFactory, router: RouterFactory
) -> None:
    """A worker that accepts and never answers is cut off at the timeout and retried."""
    workers = sims(2)
    running = await router(settings_for(workers, upstream={"first_byte_timeout_s": 0.5}))
    await set_fault(workers[0], mode="hang")
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
        responses = [
            await client.post("/v1/chat/completions", json=chat_body(f"t{i} " + HEAD, "q"))
            for i in range(6)
        ]
    assert [r.status_code for r in responses] == [200] * 6


async def test_all_workers_down_answers_503(sims: SimFactory, router: RouterFactory) -> None:
    """With every worker gone, clients get a clear 503 and /ready says not ready."""
    workers = sims(2)
    running = await router(settings_for(workers))
    for sim in workers:
        sim.process.kill()
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:

        async def unready() -> bool:
            return (await client.get("/ready")).status_code == 503

        await apoll(unready, within=15)
        response = await client.post("/v1/chat/completions", json=chat_body(HEAD, "q"))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_healthy_worker"
