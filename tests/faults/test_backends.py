"""Faults outside the workers: Redis killed and restarted under load, the KV-event sidecar
killed (events lost) and restarted, and one of three router replicas killed while the others
serve."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import redis.asyncio as aioredis
import yaml

from load_tests.procs import ServerProcess, console_script, start
from load_tests.redis_server import RedisServer
from tests.faults.conftest import FaultLog, Tally, body, client, gather_bounded, post_one, retries
from tests.integration.conftest import (
    ADMIN_TOKEN,
    RouterFactory,
    Sim,
    SimFactory,
    apoll,
    metric_value,
    settings_for,
)
from tests.integration.sim_fixtures import start_sim
from tests.integration.test_kv_events import (
    WORKER,
    Sidecar,
    connect_events,
    depth,
    start_sidecar,
    warm_index,
)

HEAD = "Field guide for the support desk: triage, refunds, shipping and warranty claims. " * 20


async def test_redis_killed_and_restarted_under_load(
    sims: SimFactory, router: RouterFactory, redis_server: RedisServer, fault_log: FaultLog
) -> None:
    """SIGKILLing Redis (warm index and load board) under load fails no request; both
    backends come back once Redis restarts."""
    workers = sims(3, decode_ms_per_token=5)
    shared = {
        "index": {"kind": "redis"},
        "loads": {"kind": "redis"},
        "redis": {"url": redis_server.url, "op_timeout_s": 0.2},
    }
    running = await router(settings_for(workers, **shared))
    tally = Tally("Redis SIGKILL + restart under load")
    assert redis_server.process is not None
    async with client() as http:
        before = await retries(http, running.url)
        jobs = [
            post_one(http, running.url, body(i, HEAD, max_tokens=12), tally) for i in range(160)
        ]
        load = asyncio.ensure_future(gather_bounded(16, jobs))

        async def progressed(n: int) -> bool:
            return tally.ok >= n

        await apoll(lambda: progressed(30), within=20)
        redis_server.process.kill()
        redis_server.process.wait(timeout=10)
        await apoll(lambda: progressed(70), within=20)
        redis_server.start()  # same port, empty

        async def backends_up() -> bool:
            text = (await http.get(running.url + "/metrics")).text
            return all(
                metric_value(text, "prefix_router_backend_up", backend=b) == 1
                for b in ("index", "loads")
            )

        await apoll(backends_up, within=20)
        await load
        tally.retried = int(await retries(http, running.url) - before)
        text = (await http.get(running.url + "/metrics")).text
    errors = metric_value(text, "prefix_router_index_errors_total")
    tally.notes = f"index fell back to the ring {errors:g} times; both backends up again"
    fault_log.record(tally)
    assert tally.ok == tally.sent == 160
    assert tally.lost == 0
    assert errors >= 1


async def test_sidecar_killed_events_lost_then_resynced(
    tmp_path: Path, router: RouterFactory, redis_server: RedisServer, fault_log: FaultLog
) -> None:
    """With the KV-event sidecar SIGKILLed, requests keep succeeding; the events it missed are
    replayed when it restarts, and the index again holds every block the worker stored."""
    ipc, replay = f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/replay"
    sim_process = start_sim(
        tmp_path, WORKER, "--decode-ms-per-token", "1",
        "--kv-events-endpoint", ipc, "--kv-events-replay-endpoint", replay,
    )  # fmt: skip
    sim = Sim(WORKER, sim_process, [])
    sidecar: Sidecar | None = None
    tally = Tally("KV-event sidecar SIGKILL, events lost, restart")
    settings = settings_for(
        [sim],
        index={"kind": "redis", "kv_events": True},
        redis={"url": redis_server.url},
    )
    try:
        sidecar = await start_sidecar(tmp_path, redis_server, ipc, "--replay-endpoint", replay)
        await connect_events(sim_process, sidecar)
        running = await router(settings)
        async with client() as http, warm_index(redis_server) as index:
            before = await retries(http, running.url)
            jobs = [post_one(http, running.url, body(i, HEAD), tally) for i in range(24)]
            await gather_bounded(8, jobs)
            sidecar.kill()
            # New heads: every block of these requests is new, and its event is lost.
            jobs = [
                post_one(http, running.url, body(i, "v2 " + HEAD), tally) for i in range(24, 48)
            ]
            await gather_bounded(8, jobs)
            records = (await http.get(sim.url + "/sim/requests", params={"limit": 24})).json()
            missed = [r["block_hashes"] for r in records["requests"]]
            assert [await depth(index, chain) for chain in missed] == [0] * len(missed)
            sidecar = await start_sidecar(
                tmp_path, redis_server, ipc, "--replay-endpoint", replay, name="sidecar-2"
            )

            probe = iter(range(48, 10_000))

            async def consistent() -> bool:
                # The sidecar learns of the gap from the next batch's sequence number, so
                # traffic keeps flowing while we wait (a fresh subscriber may miss the first).
                await post_one(http, running.url, body(next(probe), "v3 " + HEAD), tally)
                depths = [await depth(index, chain) for chain in missed]
                return depths == [len(chain) for chain in missed]

            await apoll(consistent, within=20, interval=0.2)
            tally.retried = int(await retries(http, running.url) - before)
        resyncs = await sidecar.metric("prefix_router_kv_events_resyncs_total", method="replay")
        applied = await sidecar.metric("prefix_router_kv_events_applied_total", type="BlockStored")
    finally:
        if sidecar is not None and sidecar.popen.poll() is None:
            sidecar.stop()
        sim_process.stop()
    tally.notes = f"resyncs(replay)={resyncs:g}, BlockStored applied after restart={applied:g}"
    fault_log.record(tally)
    assert tally.ok == tally.sent
    assert tally.lost == 0
    assert resyncs == 1
    assert applied >= 1


def _router_config(path: Path, workers: list[Sim], redis_url: str, ttl: float) -> Path:
    config = {
        "server": {"host": "127.0.0.1", "port": 0, "admin_token": ADMIN_TOKEN},
        "workers": [{"id": s.worker_id, "url": s.url} for s in workers],
        "tenants": {"salt_secret": "faults-secret"},
        "index": {"kind": "redis"},
        "loads": {"kind": "redis", "publish_interval_s": 0.1, "replica_ttl_s": ttl},
        "redis": {"url": redis_url},
        "health": {"probe_interval_s": 0.2, "eject_base_s": 0.5},
        "telemetry": {"access_log": False},
    }
    path.write_text(yaml.safe_dump(config))
    return path


async def test_router_replica_killed_while_others_serve(
    sims: SimFactory, redis_server: RedisServer, tmp_path: Path, fault_log: FaultLog
) -> None:
    """Of three router replicas sharing Redis, one is SIGKILLed under load: only requests in
    flight on it fail (connection errors); every request sent to the others succeeds, and the
    dead replica's loads leave the shared board within loads.replica_ttl_s."""
    ttl = 1.0
    workers = sims(3, decode_ms_per_token=10)
    config = _router_config(tmp_path / "router.yaml", workers, redis_server.url, ttl)
    argv = [*console_script("prefix-router"), "serve", "--config", str(config), "--port", "0"]
    replicas: list[ServerProcess] = [
        start(f"router-{i}", argv, log_path=tmp_path / f"router-{i}.log") for i in range(3)
    ]
    board = aioredis.Redis.from_url(redis_server.url)
    tally = Tally("router replica SIGKILL (1 of 3)")
    victim = replicas[0]
    alive = [True, True, True]
    try:

        async def victim_published() -> bool:
            # Replica ids are host-pid-random; a replica's hash exists while it has load.
            keys = [k async for k in board.scan_iter(match=f"{{pr}}:loads:r:*-{victim.pid}-*")]
            return bool(keys)

        async def send(http: httpx.AsyncClient, i: int) -> None:
            # An ingress in front: round robin over the replicas it still believes alive.
            choices = [k for k in range(3) if alive[k]]
            k = choices[i % len(choices)]
            try:
                await post_one_strict(http, replicas[k].url, i)
            except httpx.TransportError:
                assert k == 0, f"request {i} to a surviving replica failed"
                alive[0] = False
                tally.killed_replica += 1

        async def post_one_strict(http: httpx.AsyncClient, url: str, i: int) -> None:
            tally.sent += 1
            response = await http.post(
                url + "/v1/chat/completions", json=body(i, HEAD, max_tokens=20)
            )
            if response.status_code == 200:
                tally.ok += 1
            else:
                tally.failed += 1
                tally.lost += 1

        async with client() as http:
            load = asyncio.ensure_future(gather_bounded(24, [send(http, i) for i in range(150)]))

            async def progressed() -> bool:
                return tally.ok >= 40

            await apoll(progressed, within=20)
            await apoll(victim_published, within=10)
            victim.kill()
            killed_at = time.monotonic()

            async def expired() -> bool:
                return not await victim_published()

            await apoll(expired, within=ttl + 2)
            expired_after = time.monotonic() - killed_at
            await load
            tally.retried = sum([int(await retries(http, r.url)) for r in replicas[1:]])
    finally:
        await board.aclose()
        for replica in replicas:
            replica.stop()
    tally.failed += tally.killed_replica
    tally.notes = (
        f"{tally.killed_replica} connection errors on the killed replica (in flight or raced); "
        f"its loads expired from Redis {expired_after:.2f} s after the kill (ttl {ttl} s)"
    )
    fault_log.record(tally)
    assert tally.lost == 0
    assert tally.ok + tally.killed_replica == tally.sent
    assert expired_after <= ttl + 0.5
