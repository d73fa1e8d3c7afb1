"""`tenants.max_concurrent_per_tenant` across router replicas sharing Redis (``loads.kind:
redis``): the limit holds for the fleet, exactly (one atomic Redis step per admission, so no
burst or retry storm on several replicas ever puts more than the limit in flight), other
tenants are unaffected, a killed replica's tenant counts expire, a Redis outage falls back to
an estimate and then to the limit per replica (and says so). The measurements here (peak and
mean in flight, early 429s, the admission's latency) are the figures docs/reliability.md quotes.

The replicas run in this test's event loop (one is a real subprocess where it must die), the
workers are `prefix-worker sim` processes told to hold requests open (``hang``) or slow.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import yaml

from load_tests.procs import console_script, start
from load_tests.redis_server import RedisServer
from router.core.model import WorkerId
from router.index.redis import LuaScript
from router.load_scripts import ADMIT, PUBLISH
from router.loads import Admission, RedisLoadBoard
from router.tenants import TenantGate
from tests.integration.conftest import (
    RouterFactory,
    RunningRouter,
    Sim,
    SimFactory,
    apoll,
    chat_body,
    metric_value,
    router,
    set_fault,
    settings_for,
    sims,
)

__all__ = ["router", "sims"]  # fixtures, used by name

ALPHA_KEY, BETA_KEY = "sk-shared-limit-alpha-0123456789", "sk-shared-limit-beta-0123456789"
ALPHA = {"Authorization": f"Bearer {ALPHA_KEY}"}
BETA = {"Authorization": f"Bearer {BETA_KEY}"}
INTERVAL_S, TTL_S = 0.05, 0.5
BODY = chat_body("shared tenant limit", "hold this")


def tenants(limit: int) -> dict[str, Any]:
    return {
        "api_keys": [
            {"key": ALPHA_KEY, "tenant": "alpha"},
            {"key": BETA_KEY, "tenant": "beta"},
        ],
        "max_concurrent_per_tenant": limit,
    }


def shared(
    redis_url: str, interval_s: float = INTERVAL_S, ttl_s: float = TTL_S, op_timeout_s: float = 0.2
) -> dict[str, Any]:
    return {
        "loads": {"kind": "redis", "publish_interval_s": interval_s, "replica_ttl_s": ttl_s},
        "redis": {"url": redis_url, "op_timeout_s": op_timeout_s},
    }


async def replicas(
    router: RouterFactory,
    workers: list[Sim],
    redis_url: str,
    count: int,
    limit: int,
    interval_s: float = INTERVAL_S,
    **options: float,
) -> list[RunningRouter]:
    sections = shared(redis_url, interval_s, **options)
    settings = settings_for(workers, tenants=tenants(limit), **sections)
    return [await router(settings) for _ in range(count)]


# The measurements run three replicas, their clients and a sampler in one event loop on a
# small machine: a stall of that loop must not pass for a dead replica (the default TTL) or a
# slow Redis (a generous timeout), or the fallbacks would be measured instead of the limit.
MEASURED = {"ttl_s": 2.0, "op_timeout_s": 1.0}


def local_total(running: Sequence[RunningRouter], tenant: str = "alpha") -> int:
    """The tenant's requests in flight over the whole fleet (exact: summed in-process)."""
    return sum(r.state.tenant_gate.inflight(tenant) for r in running)


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    async def check() -> bool:
        return condition()

    await apoll(check, within=within, interval=0.005)


async def propagated(running: Sequence[RunningRouter], tenant: str = "alpha") -> None:
    """Wait until every replica's view of the tenant's fleet count is the exact total."""
    await until(
        lambda: all(
            r.state.tenant_gate.fleet_inflight(tenant) == local_total(running, tenant)
            for r in running
        )
    )


@dataclass
class Held:
    """Requests the worker holds open; cancelled (the client gives up) at the end."""

    tasks: list[asyncio.Task[httpx.Response]]

    async def release(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        yield http


@pytest.fixture
async def held() -> AsyncIterator[Held]:
    holder = Held([])
    yield holder
    await holder.release()


async def send_paced(
    client: httpx.AsyncClient,
    held: Held,
    running: Sequence[RunningRouter],
    target: RunningRouter,
    *,
    settle: bool = True,
) -> int | None:
    """One alpha request to ``target`` (with ``settle``, once every replica has seen the
    fleet's count): the status if it was answered (refused), None if it is admitted and held
    by the worker."""
    if settle:
        await propagated(running)
    before = local_total(running)
    task = asyncio.create_task(
        client.post(target.url + "/v1/chat/completions", json=BODY, headers=ALPHA)
    )
    await until(lambda: task.done() or local_total(running) > before)
    if task.done():
        return (await task).status_code
    held.tasks.append(task)
    return None


async def redis_dump(url: str) -> dict[bytes, Any]:
    """Every key in Redis and its value (hashes and sets as read)."""
    client = aioredis.Redis.from_url(url)
    try:
        dump: dict[bytes, Any] = {}
        async for key in client.scan_iter():
            kind = await client.type(key)
            if kind == b"hash":
                dump[key] = await client.hgetall(key)
            elif kind == b"set":
                dump[key] = await client.smembers(key)
            else:
                dump[key] = await client.dump(key)
        return dump
    finally:
        await client.aclose()


async def test_the_limit_holds_for_the_fleet_not_per_replica(
    sims: SimFactory,
    router: RouterFactory,
    redis_server: RedisServer,
    client: httpx.AsyncClient,
    held: Held,
) -> None:
    """With limit 4 and three replicas, a tenant gets 4 requests in flight in all, not 12;
    the rest get 429 on every replica, another tenant is served, and no API key is in Redis."""
    limit = 4
    (worker,) = sims(1)
    await set_fault(worker, mode="hang", count=limit)
    running = await replicas(router, [worker], redis_server.url, count=3, limit=limit)
    statuses = [await send_paced(client, held, running, running[i % 3]) for i in range(12)]
    assert statuses[:limit] == [None] * limit
    assert statuses[limit:] == [429] * (12 - limit)
    assert local_total(running) == limit
    assert [r.state.tenant_gate.scope for r in running] == ["fleet"] * 3
    for replica in running:
        other = await client.post(replica.url + "/v1/chat/completions", json=BODY, headers=BETA)
        assert other.status_code == 200
    dump = repr(await redis_dump(redis_server.url))
    assert "alpha" in dump
    for secret in (ALPHA_KEY, BETA_KEY, "integration-secret"):
        assert secret not in dump


async def test_simultaneous_requests_never_pass_the_limit(
    sims: SimFactory,
    router: RouterFactory,
    redis_server: RedisServer,
    client: httpx.AsyncClient,
    held: Held,
) -> None:
    """A burst on three replicas at once admits exactly the limit over the fleet, however the
    replicas' requests interleave; every other request gets 429, and so does a late one."""
    limit, count = 4, 3
    (worker,) = sims(1)
    await set_fault(worker, mode="hang")
    running = await replicas(router, [worker], redis_server.url, count=count, limit=limit)
    burst = [
        asyncio.create_task(client.post(r.url + "/v1/chat/completions", json=BODY, headers=ALPHA))
        for r in running
        for _ in range(2 * limit)
    ]
    held.tasks.extend(burst)
    await until(lambda: sum(t.done() for t in burst) + local_total(running) == len(burst))
    admitted = local_total(running)
    assert admitted == limit
    assert {t.result().status_code for t in burst if t.done()} == {429}
    await propagated(running)
    for replica in running:
        late = await client.post(replica.url + "/v1/chat/completions", json=BODY, headers=ALPHA)
        assert late.status_code == 429
    print(f"\nburst of {len(burst)} on {count} replicas, limit {limit}: {admitted} admitted")


@dataclass(eq=False)
class Pending:
    """One admission being decided, and whether it was admitted (None until decided)."""

    admitted: bool | None = None


@dataclass
class Refusal:
    fleet: int
    """The fleet's requests in flight, the most of when the admission began and when it was
    refused."""
    concurrent: list[Pending]
    """Admissions being decided when it was refused: any of them admitted may have been
    admitted in Redis before this refusal, though this replica had not counted it yet."""

    def early(self, limit: int) -> bool:
        """Refused although the fleet had room even if every concurrent admission that
        succeeded had been in flight already."""
        return self.fleet + sum(1 for p in self.concurrent if p.admitted) < limit


class RecordingGate(TenantGate):
    """A replica's gate that notes each admission's basis and, for each refusal, what the
    whole fleet had in flight (exact: summed over the in-process replicas) and which
    admissions were being decided anywhere in the fleet (``deciding``, shared by the gates)."""

    __slots__ = ("bases", "deciding", "fleet", "refusals")

    def __init__(
        self, replica: RunningRouter, fleet: Sequence[RunningRouter], deciding: set[Pending]
    ) -> None:
        super().__init__(replica.state.router.loads)
        self.fleet = fleet
        self.deciding = deciding
        self.refusals: list[Refusal] = []
        self.bases: Counter[str] = Counter()

    async def enter(self, tenant: str, limit: int | None) -> Admission:
        before = local_total(self.fleet, tenant)
        mine = Pending()
        self.deciding.add(mine)
        try:
            admission = await super().enter(tenant, limit)
        finally:
            self.deciding.discard(mine)
        mine.admitted = admission.admitted
        self.bases[admission.basis] += 1
        if not admission.admitted:
            fleet = max(before, local_total(self.fleet, tenant))
            self.refusals.append(Refusal(fleet, list(self.deciding)))
        return admission


@dataclass(frozen=True)
class Overshoot:
    limit: int
    replicas: int
    interval_s: float
    hold_ms: int
    requests: int
    admitted: int
    peak: int
    """Most of the tenant's requests in flight at once, over the fleet."""
    replica_peak: int
    """Most in flight at once through any one replica."""
    mean: float
    """Mean of the tenant's requests in flight over the fleet (sampled every millisecond)."""
    over_share: float
    """Share of samples with more than ``limit`` in flight."""
    bases: dict[str, int]
    """Admission decisions by what made them (``fleet``: the atomic Redis step)."""
    refused: int
    early: int
    """Refusals while the fleet had fewer than ``limit`` in flight from the start of the
    admission to its end, counting the admissions decided meanwhile (a 429 too early)."""

    def __str__(self) -> str:
        return (
            f"R={self.replicas} limit={self.limit} interval={self.interval_s}s "
            f"hold={self.hold_ms}ms: {self.requests} requests, {self.admitted} admitted, "
            f"fleet in flight peak {self.peak} (over by {self.peak - self.limit}; one "
            f"replica at most {self.replica_peak}), "
            f"mean {self.mean:.2f}, over the limit {self.over_share:.1%} of the time; "
            f"{self.refused} refused, {self.early} of them early "
            f"({self.early / max(1, self.refused):.1%}); decided by {self.bases}"
        )


async def measure_overshoot(
    client: httpx.AsyncClient,
    running: Sequence[RunningRouter],
    *,
    limit: int,
    interval_s: float,
    hold_ms: int,
    clients_per_replica: int,
    seconds: float,
    backoff_s: float | None = None,
    seed: int = 7,
) -> Overshoot:
    """Closed-loop clients of one tenant on every replica, starting at seeded random times
    within the first second (a refused one retries after its ``Retry-After``, or after
    ``backoff_s`` when given), against workers that hold each request ``hold_ms``; a sampler
    reads the fleet's exact in-flight count, and each replica's gate notes the fleet's count at
    each refusal."""
    rng = random.Random(seed)
    deciding: set[Pending] = set()
    gates = [RecordingGate(replica, running, deciding) for replica in running]
    for replica, gate in zip(running, gates, strict=True):
        replica.state.tenant_gate = gate
    stop = time.monotonic() + seconds
    outcomes: list[int] = []
    samples: list[int] = []
    replica_peak = 0

    async def one_client(replica: RunningRouter, delay: float) -> None:
        await asyncio.sleep(delay)  # arrival pacing, not waiting for state
        while time.monotonic() < stop:
            response = await client.post(
                replica.url + "/v1/chat/completions", json=BODY, headers=ALPHA
            )
            outcomes.append(response.status_code)
            if response.status_code == 429:
                retry_after = float(response.headers["Retry-After"])
                await asyncio.sleep(retry_after if backoff_s is None else backoff_s)

    async def sampler() -> None:
        nonlocal replica_peak
        while time.monotonic() < stop:
            samples.append(local_total(running))
            for replica in running:
                replica_peak = max(replica_peak, replica.state.tenant_gate.inflight("alpha"))
            await asyncio.sleep(0.001)

    clients = [
        one_client(r, rng.uniform(0, 1.0)) for r in running for _ in range(clients_per_replica)
    ]
    await asyncio.gather(sampler(), *clients)
    return Overshoot(
        limit=limit,
        replicas=len(running),
        interval_s=interval_s,
        hold_ms=hold_ms,
        requests=len(outcomes),
        admitted=sum(1 for status in outcomes if status == 200),
        peak=max(samples),
        replica_peak=replica_peak,
        mean=sum(samples) / len(samples),
        over_share=sum(1 for s in samples if s > limit) / len(samples),
        bases=dict(sum((gate.bases for gate in gates), Counter())),
        refused=sum(len(gate.refusals) for gate in gates),
        early=sum(1 for gate in gates for refusal in gate.refusals if refusal.early(limit)),
    )


# (requests held, publish interval, seconds measured); the 1 s variant is the default interval.
RETRY_AFTER_LOADS = [
    pytest.param(300, 0.05, 4.0, id="300ms"),
    pytest.param(1000, 0.1, 10.0, id="1s", marks=pytest.mark.slow),
]
# (requests held, publish interval, clients per replica, seconds measured)
STORM_LOADS = [
    pytest.param(300, 0.05, 6, 2.5, id="300ms"),
    pytest.param(1000, 0.1, 4, 6.0, id="1s", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("hold_ms", "interval_s", "seconds"), RETRY_AFTER_LOADS)
async def test_clients_honouring_retry_after_stay_near_the_fleet_limit(
    sims: SimFactory,
    router: RouterFactory,
    redis_server: RedisServer,
    client: httpx.AsyncClient,
    hold_ms: int,
    interval_s: float,
    seconds: float,
) -> None:
    """Clients of one tenant on three replicas that retry after Retry-After never have more
    than the limit in flight over the fleet, and keep it nearly full."""
    limit, count = 4, 3
    workers = sims(2)
    for worker in workers:
        await set_fault(worker, mode="slow", delay_ms=hold_ms)
    running = await replicas(
        router, workers, redis_server.url, count, limit, interval_s, **MEASURED
    )
    result = await measure_overshoot(
        client,
        running,
        limit=limit,
        interval_s=interval_s,
        hold_ms=hold_ms,
        clients_per_replica=4,
        seconds=seconds,
    )
    print(f"\nRetry-After honoured: {result}")
    assert {r.state.tenant_gate.scope for r in running} == {"fleet"}
    assert set(result.bases) == {"fleet"}
    assert result.peak <= limit
    assert result.admitted >= limit
    assert result.mean > limit / 2


@pytest.mark.parametrize(("hold_ms", "interval_s", "clients", "seconds"), STORM_LOADS)
async def test_retry_storms_never_pass_the_limit(
    sims: SimFactory,
    router: RouterFactory,
    redis_server: RedisServer,
    client: httpx.AsyncClient,
    hold_ms: int,
    interval_s: float,
    clients: int,
    seconds: float,
) -> None:
    """The worst case: clients on every replica retrying every 20 ms in step with uniform
    requests; the fleet never has more than the limit in flight, and keeps it nearly full."""
    limit, count = 4, 3
    workers = sims(2)
    for worker in workers:
        await set_fault(worker, mode="slow", delay_ms=hold_ms)
    running = await replicas(
        router, workers, redis_server.url, count, limit, interval_s, **MEASURED
    )
    result = await measure_overshoot(
        client,
        running,
        limit=limit,
        interval_s=interval_s,
        hold_ms=hold_ms,
        clients_per_replica=clients,
        seconds=seconds,
        backoff_s=0.02,
    )
    print(f"\nretry storm: {result}")
    assert set(result.bases) == {"fleet"}
    assert result.admitted >= limit
    assert result.peak <= limit
    assert result.mean > limit / 2


async def test_a_killed_replicas_tenant_counts_expire(
    sims: SimFactory,
    router: RouterFactory,
    redis_server: RedisServer,
    client: httpx.AsyncClient,
    held: Held,
    tmp_path: Path,
) -> None:
    """Requests held through a replica that is SIGKILLed stop counting against the tenant's
    limit on the survivors within loads.replica_ttl_s, and its Redis keys go away."""
    limit = 3
    (worker,) = sims(1)
    await set_fault(worker, mode="hang")
    config = {
        "server": {"port": 0},
        "workers": [{"id": worker.worker_id, "url": worker.url}],
        "tenants": {**tenants(limit), "salt_secret": "integration-secret"},
        "telemetry": {"access_log": False},
        **shared(redis_server.url),
    }
    (tmp_path / "doomed.yaml").write_text(yaml.safe_dump(config))
    argv = [*console_script("prefix-router"), "serve", "--config", str(tmp_path / "doomed.yaml")]
    doomed = start("router-doomed", argv, log_path=tmp_path / "doomed.log")
    try:
        (survivor,) = await replicas(router, [worker], redis_server.url, count=1, limit=limit)
        for _ in range(2):
            held.tasks.append(
                asyncio.create_task(
                    client.post(doomed.url + "/v1/chat/completions", json=BODY, headers=ALPHA)
                )
            )
        gate = survivor.state.tenant_gate
        await until(lambda: gate.fleet_inflight("alpha") == 2)
        assert await send_paced(client, held, [survivor], survivor, settle=False) is None
        assert await send_paced(client, held, [survivor], survivor, settle=False) == 429
        killed_at = time.monotonic()
        doomed.kill()
        await until(lambda: gate.fleet_inflight("alpha") == 1, within=TTL_S + 3.0)
        assert time.monotonic() - killed_at < TTL_S + 1.0
        assert await send_paced(client, held, [survivor], survivor, settle=False) is None
        assert await send_paced(client, held, [survivor], survivor, settle=False) is None
        assert await send_paced(client, held, [survivor], survivor, settle=False) == 429

        async def doomed_gone() -> bool:
            keys = [k for k in await redis_dump(redis_server.url) if b":r:" in k]
            return len(keys) == 2  # the survivor's two hashes only

        await apoll(doomed_gone, within=5.0)
    finally:
        doomed.kill()


async def test_redis_down_falls_back_to_the_limit_per_replica(
    sims: SimFactory,
    router: RouterFactory,
    redis_server: RedisServer,
    client: httpx.AsyncClient,
    held: Held,
) -> None:
    """With Redis down past loads.replica_ttl_s each replica applies the limit to its own
    requests, counts it and reports the backend down; with Redis back the fleet limit returns."""
    limit = 2
    (worker,) = sims(1)
    await set_fault(worker, mode="hang")
    first, second = running = await replicas(
        router, [worker], redis_server.url, count=2, limit=limit
    )
    assert await send_paced(client, held, running, first) is None
    assert await send_paced(client, held, running, second) is None
    assert await send_paced(client, held, running, first) == 429
    redis_server.stop()
    await until(lambda: all(r.state.tenant_gate.scope == "fallback" for r in running), 5.0)
    for replica in running:
        replica_only = [replica]
        assert await send_paced(client, held, replica_only, replica) is None
        assert await send_paced(client, held, replica_only, replica) == 429
    assert local_total(running) == 2 * limit
    text = (await client.get(first.url + "/metrics")).text
    assert metric_value(text, "prefix_router_tenant_limit_fallback_total") == 2
    assert metric_value(text, "prefix_router_backend_up", backend="loads") == 0
    redis_server.start()
    await until(lambda: all(r.state.tenant_gate.scope == "fleet" for r in running), 5.0)
    await propagated(running)
    assert await send_paced(client, held, running, first) == 429
    text = (await client.get(first.url + "/metrics")).text
    assert metric_value(text, "prefix_router_tenant_limit_fallback_total") == 2
    assert metric_value(text, "prefix_router_backend_up", backend="loads") == 1


# The board alone ------------------------------------------------------------------------

Boards = Callable[..., Awaitable[RedisLoadBoard]]


async def sync_all(*boards: RedisLoadBoard) -> None:
    """Publish and read on each board in turn, failing if one cannot reach Redis."""
    for board in boards:
        assert await board.sync(), board.replica_id


@pytest.fixture
async def make_board(redis_server: RedisServer) -> AsyncIterator[Boards]:
    opened: list[RedisLoadBoard] = []

    async def make(replica_id: str, **options: Any) -> RedisLoadBoard:
        # A long interval: these tests publish with sync() when they mean to.
        settings = {"publish_interval_s": 30.0, "replica_ttl_s": 60.0, **options}
        board = RedisLoadBoard(redis_server.url, replica_id=replica_id, **settings)
        await board.start()
        opened.append(board)
        return board

    yield make
    for board in opened:
        await board.close()


async def test_boards_share_tenant_counts_and_publish_only_busy_tenants(
    make_board: Boards, redis_server: RedisServer
) -> None:
    """A replica sees the others' per-tenant counts (even a replica with no worker load), and
    a replica's Redis hash holds only the tenants it has requests in flight for."""
    first, second = await make_board("r1"), await make_board("r2")
    for tenant in ("t1", "t1", "t2"):
        first.acquire_tenant(tenant)
    second.acquire_tenant("t1")
    second.acquire(WorkerId("w0"))
    await sync_all(first, second)
    assert second.tenant_others() == {"t1": 2, "t2": 1}
    assert second.tenant_load("t1") == 3
    assert second.local_tenant_load("t1") == 1
    assert second.tenant_scope == "fleet"
    first.release_tenant("t2")
    assert await first.sync()
    dump = await redis_dump(redis_server.url)
    assert dump[b"{pr}:tenants:r:r1"] == {b"t1": b"2"}
    first.release_tenant("t1")
    first.release_tenant("t1")
    await sync_all(first, second)
    dump = await redis_dump(redis_server.url)
    assert b"{pr}:tenants:r:r1" not in dump
    assert second.tenant_others() == {}
    assert first.tenant_others() == {"t1": 1}


async def test_many_tenants_fit_one_publish(make_board: Boards) -> None:
    """Thousands of busy tenants are published and read back in one round trip."""
    first, second = await make_board("r1"), await make_board("r2")
    names = [f"tenant-{i}" for i in range(5000)]
    for name in names:
        first.acquire_tenant(name)
    await sync_all(first, second)
    assert second.tenant_others() == dict.fromkeys(names, 1)


async def test_others_are_trusted_for_the_ttl_then_dropped(
    make_board: Boards, redis_server: RedisServer
) -> None:
    """With Redis down, the others' last tenant counts still count for replica_ttl_s after
    the last read, then the board counts this replica alone (scope ``fallback``)."""
    now = [1000.0]
    first = await make_board("r1")
    second = await make_board("r2", clock=lambda: now[0], replica_ttl_s=40.0)
    first.acquire_tenant("t")
    first.acquire_tenant("t")
    await sync_all(first, second)
    second.acquire_tenant("t")
    redis_server.stop()
    assert not await second.sync()
    now[0] += 39.0
    assert (second.tenant_load("t"), second.tenant_scope) == (3, "fleet")
    now[0] += 2.0
    assert (second.tenant_load("t"), second.tenant_scope) == (1, "fallback")
    assert second.tenant_others() == {}
    redis_server.start()
    await sync_all(first, second)
    assert (second.tenant_load("t"), second.tenant_scope) == (3, "fleet")


async def admit(board: RedisLoadBoard, limit: int, times: int = 1) -> list[Admission]:
    return [await board.admit_tenant("t", limit) for _ in range(times)]


async def test_admission_is_exact_across_boards_and_frees_at_once(
    make_board: Boards, redis_server: RedisServer
) -> None:
    """Two replicas that never publish share a limit of 3 exactly; a request ending on one
    frees its slot for the other within one round trip, and an idle tenant leaves Redis."""
    first, second = await make_board("r1"), await make_board("r2")
    assert [a.admitted for a in await admit(first, 3, 2)] == [True, True]
    assert await admit(second, 3, 2) == [Admission(True, "fleet"), Admission(False, "fleet")]
    assert first.local_tenant_load("t") == 2
    first.release_tenant("t")

    async def freed() -> bool:
        return (await redis_dump(redis_server.url)).get(b"{pr}:tenants:r:r1") == {b"t": b"1"}

    await apoll(freed, within=5.0)
    assert [a.admitted for a in await admit(second, 3, 2)] == [True, False]
    for board, count in ((first, 1), (second, 2)):
        for _ in range(count):
            board.release_tenant("t")

    async def idle() -> bool:
        return not any(b"tenants" in key for key in await redis_dump(redis_server.url))

    await apoll(idle, within=5.0)


async def test_a_stale_publish_never_erases_a_later_admission(
    make_board: Boards, redis_server: RedisServer
) -> None:
    """A publish snapshot taken before an admission but landing after it (another connection)
    leaves the admitted count in Redis, so the other replica still sees the tenant full."""
    first, second = await make_board("r1"), await make_board("r2")
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        assert (await first.admit_tenant("t", 2)).admitted
        # What a publish snapshot of r1 taken before that admission (version 0, no tenants)
        # would write.
        await LuaScript(PUBLISH).run(raw, "{pr}", "r1", "60000", "0", "0")
        assert (await raw.hgetall("{pr}:tenants:r:r1")) == {b"t": b"1"}
        assert await admit(second, 2, 2) == [Admission(True, "fleet"), Admission(False, "fleet")]
    finally:
        await raw.aclose()


async def test_an_admission_already_counted_by_a_snapshot_takes_itself_out_on_refusal(
    make_board: Boards, redis_server: RedisServer
) -> None:
    """When Redis holds a newer snapshot of a replica that already counts a request being
    admitted, the script checks that snapshot, and a refusal removes the request from it."""
    (other,) = [await make_board("r2")]
    assert (await other.admit_tenant("t", 4)).admitted
    raw = aioredis.Redis.from_url(redis_server.url)
    admit_script, publish = LuaScript(ADMIT), LuaScript(PUBLISH)
    try:
        # r1's snapshot at version 5 counts 3 requests: one admitted, two being admitted.
        await publish.run(raw, "{pr}", "r1", "60000", "0", "5", "t", "3")
        # The one taken at version 4: 1 elsewhere + 3 here > limit 3: refused, and taken out.
        assert await admit_script.run(raw, "{pr}", "r1", "60000", "t", "3", "4", "2") == [0, 1]
        assert await raw.hget("{pr}:tenants:r:r1", "t") == b"2"
        # The one taken at version 3 now fits (1 + 2): admitted, nothing rewritten.
        assert await admit_script.run(raw, "{pr}", "r1", "60000", "t", "3", "3", "1") == [1, 1]
        assert await raw.hget("{pr}:tenants:r:r1", "t") == b"2"
    finally:
        await raw.aclose()


async def test_redis_too_slow_decides_on_the_estimate_without_waiting_again(
    make_board: Boards, redis_server: RedisServer
) -> None:
    """With Redis frozen, an admission waits redis.op_timeout_s at most and is decided on this
    replica's count plus the others' last ones; later ones skip Redis until a publish gets
    through; then admissions are exact again."""
    first, second = await make_board("r1"), await make_board("r2", op_timeout_s=0.2)
    for _ in range(2):
        assert (await first.admit_tenant("t", 3)).admitted
    await sync_all(first, second)
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert await admit(second, 3) == [Admission(True, "estimate")]
        assert time.monotonic() - started < 1.0
        started = time.monotonic()
        assert await admit(second, 3) == [Admission(False, "estimate")]
        assert time.monotonic() - started < 0.1
        assert second.local_tenant_load("t") == 1
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    second.release_tenant("t")
    await apoll(second.sync, within=5.0)
    assert await admit(second, 3, 2) == [Admission(True, "fleet"), Admission(False, "fleet")]


async def test_admission_round_trip_latency(make_board: Boards) -> None:
    """One admission is one loopback round trip: p99 well under redis.op_timeout_s, one at a
    time and 16 at once (docs/reliability.md quotes the printed figures)."""
    first = await make_board("r1")
    await make_board("r2")  # a second replica for the script to sum over
    for _ in range(200):  # warm up: the script is loaded, connections opened
        await first.admit_tenant("t", 10_000)
        first.release_tenant("t")

    async def timed() -> float:
        started = time.perf_counter()
        admission = await first.admit_tenant("t", 10_000)
        elapsed = time.perf_counter() - started
        assert admission == Admission(True, "fleet")
        first.release_tenant("t")
        return elapsed

    alone = [await timed() for _ in range(2000)]
    crowded: list[float] = []
    for _ in range(125):
        crowded += await asyncio.gather(*(timed() for _ in range(16)))
    figures = []
    for name, samples in (("one at a time", alone), ("16 at once", crowded)):
        samples.sort()
        p50, p99 = samples[len(samples) // 2], samples[int(len(samples) * 0.99)]
        figures.append(f"{name}: p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms")
        assert p99 < 0.25
    print("\nadmission round trip, " + "; ".join(figures))
