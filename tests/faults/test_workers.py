"""Worker faults under load: crashes before and during streams, hangs, slow workers, bursts of
5xx (the circuit breaker's states), and workers removed and added while requests run."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Coroutine
from typing import Any

import httpx

from router.core.model import WorkerId
from tests.faults.conftest import (
    FaultLog,
    Tally,
    body,
    client,
    gather_bounded,
    post_one,
    retries,
    stream_one,
)
from tests.integration.conftest import (
    ADMIN_TOKEN,
    RouterFactory,
    RunningRouter,
    SimFactory,
    apoll,
    metric_value,
    set_fault,
    settings_for,
)

HEAD = "Operations manual for the night shift: escalation paths and checklists. " * 20
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def worker_state(http: httpx.AsyncClient, running: RunningRouter, worker: str) -> str:
    listing = (await http.get(running.url + "/admin/workers", headers=ADMIN)).json()["workers"]
    return next(str(w["state"]) for w in listing if w["id"] == worker)


async def test_worker_sigkilled_under_mixed_load(
    sims: SimFactory, router: RouterFactory, fault_log: FaultLog
) -> None:
    """A worker killed while serving streams and plain requests loses no plain request, and
    every stream it was serving ends with an error event then [DONE]."""
    workers = sims(3, decode_ms_per_token=15)
    running = await router(settings_for(workers))
    victim = workers[0]
    tally = Tally("worker SIGKILL under load (streams + plain)")
    async with client() as http:
        before = await retries(http, running.url)
        jobs: list[Coroutine[Any, Any, object]] = []
        for i in range(96):
            if i % 3 == 0:
                jobs.append(
                    stream_one(http, running.url, body(i, HEAD, max_tokens=40, stream=True), tally)
                )
            else:
                jobs.append(post_one(http, running.url, body(i, HEAD, max_tokens=20), tally))
        load = asyncio.ensure_future(gather_bounded(24, jobs))
        victim_worker = running.state.pool.get(WorkerId(victim.worker_id))
        assert victim_worker is not None

        async def busy() -> bool:
            return victim_worker.inflight >= 2

        await apoll(busy, within=15)
        victim.process.kill()
        await load
        tally.retried = int(await retries(http, running.url) - before)
    tally.notes = "SIGKILL while busy; 2 of 3 workers stay healthy"
    fault_log.record(tally)
    assert tally.lost == 0
    assert tally.ok + tally.streams_cut == tally.sent
    assert tally.streams_cut == tally.streams_cut_cleanly


async def test_worker_crashes_mid_stream(
    sims: SimFactory, router: RouterFactory, fault_log: FaultLog
) -> None:
    """A worker that dies after sending part of a stream: that stream ends with an error event
    then [DONE]; requests after it are retried elsewhere and succeed."""
    workers = sims(2, decode_ms_per_token=5)
    running = await router(settings_for(workers))
    tally = Tally("worker crash mid-stream (after_chunks=3)")
    await set_fault(workers[0], mode="crash", after_chunks=3, count=1)
    async with client() as http:
        before = await retries(http, running.url)
        jobs = [
            stream_one(http, running.url, body(i, HEAD, max_tokens=20, stream=True), tally)
            if i % 2 == 0
            else post_one(http, running.url, body(i, HEAD), tally)
            for i in range(48)
        ]
        results = await gather_bounded(16, jobs)
        tally.retried = int(await retries(http, running.url) - before)
    cut = [r for r in results if not isinstance(r, str) and r.error is not None]
    tally.notes = "crash fault with after_chunks on 1 of 2 workers"
    fault_log.record(tally)
    assert tally.lost == 0
    assert tally.streams_cut >= 1
    assert tally.streams_cut == tally.streams_cut_cleanly
    assert all(r.worker == workers[0].worker_id for r in cut)


async def test_worker_crashes_before_first_byte(
    sims: SimFactory, router: RouterFactory, fault_log: FaultLog
) -> None:
    """A worker that dies on accepting a request (before any byte) costs no request: streams
    and plain requests are all retried on the other worker."""
    workers = sims(2)
    running = await router(settings_for(workers))
    tally = Tally("worker crash before first byte")
    await set_fault(workers[0], mode="crash")
    async with client() as http:
        before = await retries(http, running.url)
        jobs = [
            stream_one(http, running.url, body(i, HEAD, stream=True), tally)
            if i % 2 == 0
            else post_one(http, running.url, body(i, HEAD), tally)
            for i in range(40)
        ]
        await gather_bounded(16, jobs)
        tally.retried = int(await retries(http, running.url) - before)
    fault_log.record(tally)
    assert tally.ok == tally.sent
    assert tally.lost == 0
    assert tally.streams_cut == 0
    assert tally.retried >= 1


async def test_hung_worker_is_timed_out_and_ejected(
    sims: SimFactory, router: RouterFactory, fault_log: FaultLog
) -> None:
    """A worker that never answers costs clients only the first-byte timeout: every request
    succeeds elsewhere, and the worker is ejected."""
    workers = sims(2)
    running = await router(settings_for(workers, upstream={"first_byte_timeout_s": 0.3}))
    tally = Tally("worker hang (no bytes)")
    await set_fault(workers[0], mode="hang")
    async with client() as http:
        before = await retries(http, running.url)
        jobs: list[Coroutine[Any, Any, object]] = [
            post_one(http, running.url, body(i, HEAD), tally) for i in range(48)
        ]
        jobs += [
            stream_one(http, running.url, body(i, HEAD, stream=True), tally) for i in range(48, 64)
        ]
        await gather_bounded(16, jobs)
        tally.retried = int(await retries(http, running.url) - before)
        text = (await http.get(running.url + "/metrics")).text
    ejections = metric_value(text, "prefix_router_worker_ejections_total", worker="w0")
    tally.notes = f"first_byte_timeout_s=0.3; w0 ejections={ejections:g}"
    fault_log.record(tally)
    assert tally.ok == tally.sent
    assert tally.lost == 0
    assert tally.retried >= 1
    assert ejections >= 1


async def test_slow_worker_times_out_then_is_ejected(
    sims: SimFactory, router: RouterFactory, fault_log: FaultLog
) -> None:
    """A worker slower than the timeout is retried around, then shows as ejected in
    /admin/workers and in prefix_router_worker_ejections_total."""
    workers = sims(2)
    settings = settings_for(
        workers,
        upstream={"first_byte_timeout_s": 0.3},
        health={"eject_base_s": 5.0, "probe_interval_s": 0.2},
    )
    running = await router(settings)
    tally = Tally("slow worker (delay 2 s > timeout 0.3 s)")
    await set_fault(workers[0], mode="slow", delay_ms=2000)
    async with client() as http:
        before = await retries(http, running.url)
        await gather_bounded(
            16, [post_one(http, running.url, body(i, HEAD), tally) for i in range(48)]
        )
        tally.retried = int(await retries(http, running.url) - before)
        state = await worker_state(http, running, "w0")
        text = (await http.get(running.url + "/metrics")).text
    ejections = metric_value(text, "prefix_router_worker_ejections_total", worker="w0")
    tally.notes = f"w0 state={state}, ejections={ejections:g}"
    fault_log.record(tally)
    assert tally.ok == tally.sent
    assert tally.lost == 0
    assert state == "ejected"
    assert ejections >= 1
    assert tally.retried >= 1


async def test_5xx_burst_opens_half_opens_and_closes_the_circuit(
    sims: SimFactory, router: RouterFactory, fault_log: FaultLog
) -> None:
    """A burst of 500s opens the worker's circuit (ejected), it half-opens after eject_base_s,
    stays out while /health fails, and closes once /health passes again; no request fails."""
    workers = sims(2)
    settings = settings_for(
        workers,
        health={"failures_to_eject": 3, "eject_base_s": 0.3, "probe_interval_s": 0.1,
                "probe_timeout_s": 0.5, "eject_max_s": 1.0},
    )  # fmt: skip
    running = await router(settings)
    victim = workers[0]
    tally = Tally("burst of 5xx (error x8)")
    await set_fault(victim, mode="error", status=500, count=8)
    seen: list[str] = []
    async with client() as http:
        before = await retries(http, running.url)

        async def in_state(wanted: str) -> bool:
            state = await worker_state(http, running, victim.worker_id)
            if not seen or seen[-1] != state:
                seen.append(state)
            return state == wanted

        await gather_bounded(
            16, [post_one(http, running.url, body(i, HEAD), tally) for i in range(32)]
        )
        await apoll(lambda: in_state("ejected"), within=5, interval=0.01)
        # The sim's /health always passes; freezing the process makes the half-open probe
        # time out, so half-open lasts a whole probe timeout and can be seen.
        os.kill(victim.process.pid, signal.SIGSTOP)
        try:
            await apoll(lambda: in_state("half_open"), within=5, interval=0.01)
        finally:
            os.kill(victim.process.pid, signal.SIGCONT)
        await set_fault(victim, mode="none")
        await apoll(lambda: in_state("healthy"), within=10, interval=0.01)
        after = await gather_bounded(
            16, [post_one(http, running.url, body(i, HEAD), tally) for i in range(32, 64)]
        )
        tally.retried = int(await retries(http, running.url) - before)
    tally.notes = "states seen: " + " -> ".join(seen)
    fault_log.record(tally)
    assert tally.ok == tally.sent
    assert tally.lost == 0
    assert tally.retried >= 1
    assert victim.worker_id in after


async def test_worker_removed_and_added_under_load(
    sims: SimFactory, router: RouterFactory, fault_log: FaultLog
) -> None:
    """Removing a worker under load lets its in-flight requests finish; a worker added under
    load starts taking requests; nothing fails."""
    workers = sims(3, decode_ms_per_token=20)
    running = await router(settings_for(workers[:2]))
    removed, added = workers[0], workers[2]
    tally = Tally("worker removed + added under load")
    async with client() as http:
        before = await retries(http, running.url)
        jobs = [post_one(http, running.url, body(i, HEAD, max_tokens=25), tally) for i in range(96)]
        load = asyncio.ensure_future(gather_bounded(16, jobs))
        member = running.state.pool.get(WorkerId(removed.worker_id))
        assert member is not None

        async def busy() -> bool:
            return member.inflight >= 2

        await apoll(busy, within=15)
        in_flight_at_removal = member.inflight
        gone = await http.delete(running.url + f"/admin/workers/{removed.worker_id}", headers=ADMIN)
        assert gone.status_code == 200
        spec = {"id": added.worker_id, "url": added.url}
        assert (
            await http.post(running.url + "/admin/workers", json=spec, headers=ADMIN)
        ).status_code == 201
        answered_by = await load
        tally.retried = int(await retries(http, running.url) - before)
    tally.notes = f"{in_flight_at_removal} in flight on the removed worker at removal"
    fault_log.record(tally)
    assert tally.ok == tally.sent
    assert tally.lost == 0
    assert answered_by.count(removed.worker_id) >= in_flight_at_removal
    assert added.worker_id in answered_by
    assert member.inflight == 0
