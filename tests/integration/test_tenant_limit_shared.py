"""`tenants.max_concurrent_per_tenant` across router replicas sharing Redis (``loads.kind:
redis``): the limit holds for the fleet, exactly (one atomic Redis step per admission, so no
burst or retry storm on several replicas ever puts more than the limit in flight), other
tenants are unaffected, a killed replica's tenant counts expire, a Redis outage falls back to
an estimate and then to the limit per replica (and says so). The measurements here (peak and
mean in flight, early 429s) are the figures docs/reliability.md quotes; the board itself, and
the admission's latency, are tested in `test_tenant_admission.py`.

The replicas run in this test's event loop (one is a real subprocess where it must die), the
workers are `prefix-worker sim` processes told to hold requests open (``hang``) or slow.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from load_tests.procs import console_script, start
from load_tests.redis_server import RedisServer
from router.loads import Admission
from router.tenants import TenantGate
from tests.integration.conftest import (
    RouterFactory,
    RunningRouter,
    Sim,
    SimFactory,
    apoll,
    chat_body,
    metric_value,
    redis_dump,
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


MEASURED_LIMIT = 4


async def slow_fleet(
    sims: SimFactory, router: RouterFactory, redis_url: str, hold_ms: int, interval_s: float
) -> list[RunningRouter]:
    """The measured fleet: three replicas, limit `MEASURED_LIMIT`, over two workers that hold
    each request ``hold_ms``."""
    workers = sims(2)
    for worker in workers:
        await set_fault(worker, mode="slow", delay_ms=hold_ms)
    return await replicas(router, workers, redis_url, 3, MEASURED_LIMIT, interval_s, **MEASURED)


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
    limit = MEASURED_LIMIT
    running = await slow_fleet(sims, router, redis_server.url, hold_ms, interval_s)
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
    limit = MEASURED_LIMIT
    running = await slow_fleet(sims, router, redis_server.url, hold_ms, interval_s)
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
