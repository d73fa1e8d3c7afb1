"""In-flight requests per worker and per tenant, counted across every router replica.

The bounded-load cap (DESIGN 3.3) must hold for the whole cluster, not per replica: with R
replicas each allowed ``cap`` on a worker, the worker could get R times its share. The same
goes for ``tenants.max_concurrent_per_tenant``: an operator means the number for the fleet, and
a per-replica limit would change whenever the autoscaler changes R. A `LoadBoard` answers "how
many requests are in flight on worker w" and admits tenants' requests against their limit.

- `LocalLoadBoard`: this process only (one replica; the default). Exact, no network.
- `RedisLoadBoard`: this replica's exact counts plus the other replicas' published ones.
  A background task publishes this replica's counts every ``publish_interval_s`` and reads
  the others' in the same round trip (one Lua script). Each replica's counts live in its own
  hashes, ``{prefix}:loads:r:<replica>`` (per worker) and ``{prefix}:tenants:r:<replica>``
  (per tenant), whose TTL (``replica_ttl_s``) is refreshed by each publish, so a replica that
  dies stops counting within ``replica_ttl_s``; a clean `close` withdraws its counts at once.
  Only nonzero counts are kept, so an idle tenant leaves no trace. The set
  ``{prefix}:loads:replicas`` lists publishers and is pruned of replicas whose hashes are both
  gone. Tenant fields are tenant names (what metrics and logs show), never a key.

Worker loads (`acquire`, `release`, `load`, `loads`) never touch the network: the others'
counts are up to two publish intervals old, which the cap tolerates (it bounds spread).

A tenant's limit must be exact, so with a limit set `admit_tenant` takes one atomic Redis step
(router/load_scripts.py): it sums every live replica's count for the tenant and, if this
request fits, stores this replica's new count, in the same script. The request is counted
locally (pending) *before* the script, and every write of this replica's tenant counts (by an
admission, the publish or `flush_releases`) is its local count at one instant with a version
taken then; Redis ignores a write older than the one it holds. So Redis always holds a snapshot
that counts every admitted request: a publish racing an admission can over-count (an early 429
at worst), never under-count. The end of a request admitted this way wakes a background writer,
so the others see the freed slot about one round trip later, not one publish later.

If the script fails or times out (``redis.op_timeout_s``), or the last call failed, the request
is decided on an estimate: this replica's count plus the others' last published ones, trusted
for ``replica_ttl_s`` after the last successful read, then this replica's alone (`tenant_scope`
says which); no request fails for Redis. Counts are clamped at zero.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

import redis.asyncio as aioredis

from router.core.model import WorkerId
from router.index.redis import FAILURES, LuaScript, redis_client
from router.load_scripts import ADMIT, PUBLISH, RELEASE, WITHDRAW, parse_totals
from router.tasks import cancel_and_wait

log = logging.getLogger("prefix_router.loads")

TenantScope = Literal["replica", "fleet", "fallback"]
"""What a tenant's estimated count covers: ``replica`` (a local board: this replica by design),
``fleet`` (every replica whose counts are fresh), ``fallback`` (a shared board that has no
fresh counts from the others: Redis unreachable for longer than ``replica_ttl_s``)."""

AdmissionBasis = Literal["unlimited", "replica", "fleet", "estimate", "local"]


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether a tenant's request may start, and what the decision was based on."""

    admitted: bool
    basis: AdmissionBasis
    """``unlimited`` (no limit), ``replica`` (a local board: exact for this replica),
    ``fleet`` (the atomic Redis step: exact for the fleet), ``estimate`` (Redis failed: this
    replica's count plus the others' last published ones), ``local`` (Redis failed and the
    others' counts are too old: this replica's count alone)."""

    @property
    def fallback(self) -> bool:
        """True when the loads are shared but Redis could not decide."""
        return self.basis in ("estimate", "local")


class TenantLoads(Protocol):
    async def admit_tenant(self, tenant: str, limit: int) -> Admission:
        """Count one more request for ``tenant`` if its requests in flight stay within
        ``limit``; nothing is counted on refusal. Never raises for Redis."""
        ...

    def acquire_tenant(self, tenant: str) -> None:
        """A request of ``tenant`` starts without a limit (synchronous, no I/O)."""
        ...

    def release_tenant(self, tenant: str) -> None:
        """An admitted request of ``tenant`` ended, however it ended (synchronous, no I/O)."""
        ...

    def tenant_load(self, tenant: str) -> int:
        """Requests of ``tenant`` in flight (or being admitted) across every replica whose
        counts are known, as last published."""
        ...

    def local_tenant_load(self, tenant: str) -> int:
        """Admitted requests of ``tenant`` in flight through this replica."""
        ...

    @property
    def tenant_scope(self) -> TenantScope: ...


class LoadBoard(TenantLoads, Protocol):
    def acquire(self, worker: WorkerId) -> None:
        """A request to ``worker`` starts (synchronous, no I/O)."""
        ...

    def release(self, worker: WorkerId) -> None:
        """A request to ``worker`` ended, however it ended (synchronous, no I/O)."""
        ...

    def load(self, worker: WorkerId) -> int:
        """Requests in flight on ``worker`` across every replica."""
        ...

    def loads(self) -> dict[WorkerId, int]:
        """In-flight requests per worker across every replica (workers with none omitted)."""
        ...

    @property
    def available(self) -> bool:
        """False while shared counts cannot be published or read (local counts still work)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def merge_loads(*counts: Mapping[WorkerId, int]) -> dict[WorkerId, int]:
    """Sum per-worker counts, dropping workers at zero (negative counts count as zero)."""
    merged: dict[WorkerId, int] = {}
    for mapping in counts:
        for worker, count in mapping.items():
            if count > 0:
                merged[worker] = merged.get(worker, 0) + count
    return merged


_Key = TypeVar("_Key", bound=Hashable)


class InFlightCounts(Generic[_Key]):
    """Nonzero in-flight counts by key; a key whose count drops to zero is forgotten."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[_Key, int] = {}

    def acquire(self, key: _Key) -> None:
        self._counts[key] = self._counts.get(key, 0) + 1

    def release(self, key: _Key) -> None:
        count = self._counts.get(key, 0)
        if count > 1:
            self._counts[key] = count - 1
        else:
            # Clamp at zero: a release without its acquire (a bug elsewhere) must not make a
            # worker look emptier than idle, or give a tenant more than its limit. Dropping the
            # key keeps the table (and what is published) as small as what is busy now.
            self._counts.pop(key, None)

    def get(self, key: _Key) -> int:
        return self._counts.get(key, 0)

    def snapshot(self) -> dict[_Key, int]:
        return dict(self._counts)


class LocalLoadBoard:
    """In-flight counts of this process only."""

    __slots__ = ("_tenants", "_workers")

    def __init__(self) -> None:
        self._workers: InFlightCounts[WorkerId] = InFlightCounts()
        self._tenants: InFlightCounts[str] = InFlightCounts()

    def acquire(self, worker: WorkerId) -> None:
        self._workers.acquire(worker)

    def release(self, worker: WorkerId) -> None:
        self._workers.release(worker)

    def load(self, worker: WorkerId) -> int:
        return self._workers.get(worker)

    def loads(self) -> dict[WorkerId, int]:
        return self._workers.snapshot()

    async def admit_tenant(self, tenant: str, limit: int) -> Admission:
        if self._tenants.get(tenant) >= limit:
            return Admission(False, "replica")
        self._tenants.acquire(tenant)
        return Admission(True, "replica")

    def acquire_tenant(self, tenant: str) -> None:
        self._tenants.acquire(tenant)

    def release_tenant(self, tenant: str) -> None:
        self._tenants.release(tenant)

    def tenant_load(self, tenant: str) -> int:
        return self._tenants.get(tenant)

    def local_tenant_load(self, tenant: str) -> int:
        return self._tenants.get(tenant)

    def tenant_loads(self) -> dict[str, int]:
        """In-flight requests per tenant (tenants with none omitted)."""
        return self._tenants.snapshot()

    @property
    def tenant_scope(self) -> TenantScope:
        return "replica"

    @property
    def available(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


_CONNECTIONS = 8
"""Redis connections per board: one for the publish, the rest for concurrent admissions."""


def default_replica_id() -> str:
    """Host, pid and a random suffix: unique even when pids repeat across containers."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class RedisLoadBoard:
    """Loads shared through Redis: local exact counts plus the other replicas' published ones;
    tenants admitted by one atomic Redis step each."""

    def __init__(
        self,
        url: str,
        *,
        replica_id: str | None = None,
        prefix: str = "pr",
        publish_interval_s: float = 0.1,
        replica_ttl_s: float = 2.0,
        op_timeout_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if publish_interval_s <= 0 or op_timeout_s <= 0:
            raise ValueError("publish_interval_s and op_timeout_s must be > 0")
        if replica_ttl_s <= publish_interval_s:
            raise ValueError("replica_ttl_s must be longer than publish_interval_s")
        self.replica_id = replica_id or default_replica_id()
        self._url = url
        self._tag = "{" + prefix + "}"
        self._interval = publish_interval_s
        self._ttl = replica_ttl_s
        self._ttl_ms = str(max(1, round(replica_ttl_s * 1000)))
        self._op_timeout = op_timeout_s
        self._clock = clock
        self._local = LocalLoadBoard()
        self._pending: InFlightCounts[str] = InFlightCounts()
        """Requests counted for their tenant while their admission is being decided."""
        self._version = 0
        """Taken with each snapshot of the tenant counts written to Redis (see the module)."""
        self._others: dict[WorkerId, int] = {}
        self._tenant_others: dict[str, int] = {}
        self._shared = False
        """True while the others' counts are fresh (read less than ``replica_ttl_s`` ago)."""
        self._others_until = 0.0
        """clock() time after which the others' counts are too old to use."""
        self._publish = LuaScript(PUBLISH)
        self._admit = LuaScript(ADMIT)
        self._withdraw = LuaScript(WITHDRAW)
        self._release = LuaScript(RELEASE)
        self._limited: set[str] = set()
        """Tenants admitted through Redis since their count was last zero there."""
        self._released: set[str] = set()
        """Of those, the ones whose requests ended since the last flush."""
        self._wake_flusher = asyncio.Event()
        self._client: aioredis.Redis | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._available = False

    # hot path ----------------------------------------------------------------------------
    def acquire(self, worker: WorkerId) -> None:
        self._local.acquire(worker)

    def release(self, worker: WorkerId) -> None:
        self._local.release(worker)

    def load(self, worker: WorkerId) -> int:
        local = self._local.load(worker)
        return local + self._others.get(worker, 0) if self._fresh() else local

    def loads(self) -> dict[WorkerId, int]:
        if self._fresh():
            return merge_loads(self._local.loads(), self._others)
        return self._local.loads()

    def local_loads(self) -> dict[WorkerId, int]:
        """This replica's own in-flight counts."""
        return self._local.loads()

    def others(self) -> dict[WorkerId, int]:
        """The other replicas' counts as last read, or nothing once they are too old."""
        return dict(self._others) if self._fresh() else {}

    # tenants -----------------------------------------------------------------------------
    async def admit_tenant(self, tenant: str, limit: int) -> Admission:
        # Counted before the script, so any snapshot taken from here on includes it.
        self._pending.acquire(tenant)
        try:
            admitted = await self._admit_in_redis(tenant, limit)
        except BaseException:
            self._pending.release(tenant)
            raise
        if admitted is not None:
            self._pending.release(tenant)
            if admitted:
                self._local.acquire_tenant(tenant)
                self._limited.add(tenant)
            return Admission(admitted, "fleet")
        # Redis could not decide: the estimate, this request and those being admitted included.
        basis: AdmissionBasis = "estimate" if self._fresh() else "local"
        admitted = self.tenant_load(tenant) <= limit
        self._pending.release(tenant)
        if admitted:
            self._local.acquire_tenant(tenant)
        return Admission(admitted, basis)

    async def _admit_in_redis(self, tenant: str, limit: int) -> bool | None:
        """The admission script's answer, or None when Redis failed (or is known down)."""
        if self._client is None or not self._available:
            return None
        self._version += 1
        args = [self._tag, self.replica_id, self._ttl_ms, tenant, str(limit), str(self._version)]
        args.append(str(self._held(tenant)))
        try:
            async with asyncio.timeout(self._op_timeout):
                verdict, _ = await self._admit.run(self._client, *args)
        except FAILURES as exc:
            if self._available:
                # Later admissions skip Redis until the next publish gets through.
                log.warning("load board: admission in Redis failed (%r); using estimates", exc)
            self._available = False
            return None
        return int(verdict) == 1

    def _held(self, tenant: str) -> int:
        return self._local.tenant_load(tenant) + self._pending.get(tenant)

    def acquire_tenant(self, tenant: str) -> None:
        self._local.acquire_tenant(tenant)

    def release_tenant(self, tenant: str) -> None:
        self._local.release_tenant(tenant)
        if tenant in self._limited:
            self._released.add(tenant)
            self._wake_flusher.set()

    def tenant_load(self, tenant: str) -> int:
        held = self._held(tenant)
        return held + self._tenant_others.get(tenant, 0) if self._fresh() else held

    def local_tenant_load(self, tenant: str) -> int:
        return self._local.tenant_load(tenant)

    def tenant_loads(self) -> dict[str, int]:
        """Requests in flight or being admitted per tenant, over every replica whose counts
        are fresh."""
        merged = self._tenant_others.copy() if self._fresh() else {}
        for counts in (self._local.tenant_loads(), self._pending.snapshot()):
            for tenant, count in counts.items():
                merged[tenant] = merged.get(tenant, 0) + count
        return merged

    def tenant_others(self) -> dict[str, int]:
        """The other replicas' per-tenant counts as last read, or nothing once too old."""
        return dict(self._tenant_others) if self._fresh() else {}

    @property
    def tenant_scope(self) -> TenantScope:
        return "fleet" if self._fresh() else "fallback"

    def _fresh(self) -> bool:
        if self._shared and self._clock() > self._others_until:
            self._shared = False
            self._others = {}
            self._tenant_others = {}
            log.warning(
                "load board: no word from Redis for %.1fs; worker loads and tenant limits "
                "now count this replica's requests alone",
                self._ttl,
            )
        return self._shared

    @property
    def available(self) -> bool:
        """True when the last call to Redis succeeded."""
        return self._available

    # lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Publish once and start publishing every interval; never fails if Redis is down."""
        self._client = redis_client(
            self._url, op_timeout_s=self._op_timeout, max_connections=_CONNECTIONS
        )
        await self.sync()
        self._tasks = [
            asyncio.create_task(self._publish_forever(), name="redis-load-board"),
            asyncio.create_task(self._flush_forever(), name="redis-load-board-releases"),
        ]

    async def close(self, *, withdraw: bool = True) -> None:
        """Stop publishing; with ``withdraw`` (a clean shutdown), remove this replica's
        counts now rather than letting them expire."""
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        if self._client is None:
            return
        if withdraw:
            try:
                async with asyncio.timeout(self._op_timeout):
                    await self._withdraw.run(self._client, self._tag, self.replica_id)
            except FAILURES:
                log.info("load board: could not withdraw counts; they expire with the TTL")
        await self._client.aclose()
        self._client = None

    async def sync(self) -> bool:
        """Publish this replica's counts and read the others' now (one round trip).
        Returns False, without raising, when Redis cannot be reached."""
        if self._client is None:
            return False
        workers = self._local.loads()
        self._version += 1
        args = [self._tag, self.replica_id, self._ttl_ms, str(len(workers)), str(self._version)]
        for worker, count in workers.items():
            args += (worker, str(count))
        tenants = self._local.tenant_loads()
        for tenant, count in self._pending.snapshot().items():
            tenants[tenant] = tenants.get(tenant, 0) + count
        for tenant, count in tenants.items():
            args += (tenant, str(count))
        try:
            async with asyncio.timeout(self._op_timeout):
                reply = await self._publish.run(self._client, *args)
        except FAILURES as exc:
            if self._available:
                log.warning("load board: Redis unreachable (%r); using local counts", exc)
            self._available = False
            return False
        if not self._available:
            log.info("load board: sharing loads through Redis as %s", self.replica_id)
        self._available = True
        worker_totals, tenant_totals = reply
        self._others = {WorkerId(w): c for w, c in parse_totals(worker_totals).items()}
        self._tenant_others = parse_totals(tenant_totals)
        self._others_until = self._clock() + self._ttl
        self._shared = True
        return True

    async def flush_releases(self) -> bool:
        """Write the counts of limited tenants whose requests ended since the last flush
        (one round trip, none if there are none). False, without raising, if Redis failed:
        the next publish writes them anyway."""
        released, self._released = self._released, set()
        if self._client is None or not released:
            return True
        self._version += 1
        args = [self._tag, self.replica_id, self._ttl_ms, str(self._version)]
        for tenant in released:
            held = self._held(tenant)
            args += (tenant, str(held))
            if held == 0:
                self._limited.discard(tenant)
        try:
            async with asyncio.timeout(self._op_timeout):
                await self._release.run(self._client, *args)
        except FAILURES:
            return False
        return True

    async def _flush_forever(self) -> None:
        # One flush in flight at most: releases during it are written by the next one.
        while True:
            await self._wake_flusher.wait()
            self._wake_flusher.clear()
            try:
                await self.flush_releases()
            except Exception:
                log.exception("load board: release flush error")

    async def _publish_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.sync()
            except Exception:
                # Never let a surprise end the task: this replica would stop counting.
                log.exception("load board: publish error")
