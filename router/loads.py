"""In-flight requests per worker and per tenant, counted across every router replica.

The bounded-load cap (DESIGN 3.3) must hold for the whole cluster, not per replica: with R
replicas each allowed ``cap`` on a worker, the worker could get R times its share. The same
goes for ``tenants.max_concurrent_per_tenant``: an operator means the number for the fleet, and
a per-replica limit would change whenever the autoscaler changes R. A `LoadBoard` answers "how
many requests are in flight on worker w" and "how many for tenant t", across all replicas.

- `LocalLoadBoard`: this process only (one replica; the default).
- `RedisLoadBoard`: this replica's exact counts plus the other replicas' last published ones.
  A background task publishes this replica's counts every ``publish_interval_s`` and reads
  the others' in the same round trip (one Lua script). Each replica's counts live in its own
  hashes, ``{prefix}:loads:r:<replica>`` (per worker) and ``{prefix}:tenants:r:<replica>``
  (per tenant), whose TTL (``replica_ttl_s``) is refreshed by each publish, so a replica that
  dies stops counting within ``replica_ttl_s``; a clean `close` withdraws its counts at once.
  Each publish rewrites both hashes with the nonzero counts only, so they hold no more fields
  than the replica has workers and tenants busy right now (an idle tenant leaves no trace).
  The set ``{prefix}:loads:replicas`` lists publishers and is pruned of replicas whose hashes
  are both gone. Tenant fields are tenant names (what metrics and logs show), never a key.

The hot path (`acquire`, `release`, `load`, `loads` and their tenant twins) never touches the
network and never raises. The others' counts as this replica sees them are up to two publish
intervals plus a round trip old (they published up to one interval before this replica's last
read, which is up to one interval old): the cap tolerates that (it bounds spread), and the
tenant limit can be exceeded by what the other replicas admitted in that window (never by more
than R - 1 times the limit; docs/reliability.md has the figures). If Redis is down the board
keeps retrying each interval; the others' last counts are trusted for ``replica_ttl_s`` after
the last successful read (as Redis itself would have kept them), then dropped, so the router
balances and limits tenants on its own counts alone rather than on stale ones (`tenant_scope`
says which). Counts are clamped at zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Generic, Literal, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from router.core.model import WorkerId
from router.index.redis import LuaScript, redis_client

log = logging.getLogger("prefix_router.loads")

TenantScope = Literal["replica", "fleet", "fallback"]
"""What a tenant's count covers: ``replica`` (a local board: this replica by design),
``fleet`` (every replica whose counts are fresh), ``fallback`` (a shared board that has no
fresh counts from the others: Redis unreachable for longer than ``replica_ttl_s``)."""


class TenantLoads(Protocol):
    def acquire_tenant(self, tenant: str) -> None:
        """A request of ``tenant`` starts (synchronous, no I/O)."""
        ...

    def release_tenant(self, tenant: str) -> None:
        """A request of ``tenant`` ended, however it ended (synchronous, no I/O)."""
        ...

    def tenant_load(self, tenant: str) -> int:
        """Requests of ``tenant`` in flight across every replica whose counts are known."""
        ...

    def local_tenant_load(self, tenant: str) -> int:
        """Requests of ``tenant`` in flight through this replica."""
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


# ARGV: tag, replica id, ttl (ms), n, then n (worker, count) pairs, then (tenant, count) pairs.
# Rewrites this replica's two hashes with the counts given (so idle workers and tenants leave
# them), refreshes their TTL, and returns the other live replicas' counts summed per worker
# and per tenant: {{worker, total, ...}, {tenant, total, ...}}. A replica whose hashes both
# expired is pruned from the set. HSET takes the pairs in slices: unpack has a stack limit.
_PUBLISH = """
local tag, me, ttl, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local replicas = tag .. ':loads:replicas'
local function put(key, first, last)
  redis.call('DEL', key)
  for i = first, last, 200 do
    redis.call('HSET', key, unpack(ARGV, i, math.min(last, i + 199)))
  end
  if last >= first then
    redis.call('PEXPIRE', key, ttl)
  end
end
put(tag .. ':loads:r:' .. me, 5, 4 + 2 * n)
put(tag .. ':tenants:r:' .. me, 5 + 2 * n, #ARGV)
redis.call('SADD', replicas, me)
local function add(totals, order, flat)
  for i = 1, #flat, 2 do
    local k = flat[i]
    if totals[k] == nil then
      totals[k] = 0
      order[#order + 1] = k
    end
    totals[k] = totals[k] + tonumber(flat[i + 1])
  end
end
local function flatten(totals, order)
  local out = {}
  for _, k in ipairs(order) do
    out[#out + 1] = k
    out[#out + 1] = totals[k]
  end
  return out
end
local wt, wo, tt, to = {}, {}, {}, {}
for _, r in ipairs(redis.call('SMEMBERS', replicas)) do
  if r ~= me then
    local workers = redis.call('HGETALL', tag .. ':loads:r:' .. r)
    local tenants = redis.call('HGETALL', tag .. ':tenants:r:' .. r)
    if #workers == 0 and #tenants == 0 then
      redis.call('SREM', replicas, r)
    else
      add(wt, wo, workers)
      add(tt, to, tenants)
    end
  end
end
return {flatten(wt, wo), flatten(tt, to)}
"""

# ARGV: tag, replica id. A clean shutdown withdraws this replica's counts at once.
_WITHDRAW = """
redis.call('DEL', ARGV[1] .. ':loads:r:' .. ARGV[2], ARGV[1] .. ':tenants:r:' .. ARGV[2])
redis.call('SREM', ARGV[1] .. ':loads:replicas', ARGV[2])
return 1
"""

_FAILURES = (RedisError, OSError, TimeoutError)


def default_replica_id() -> str:
    """Host, pid and a random suffix: unique even when pids repeat across containers."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def parse_totals(flat: list[Any]) -> dict[str, int]:
    """``[name, count, ...]`` from the publish script as a mapping (counts below 1 dropped)."""
    totals: dict[str, int] = {}
    for i in range(0, len(flat) - 1, 2):
        name = flat[i]
        # Names are written by replicas as UTF-8; replace rather than fail on anything else.
        key = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
        count = int(flat[i + 1])
        if count > 0:
            totals[key] = count
    return totals


class RedisLoadBoard:
    """Loads shared through Redis: local exact counts plus the other replicas' published ones."""

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
        self._others: dict[WorkerId, int] = {}
        self._tenant_others: dict[str, int] = {}
        self._shared = False
        """True while the others' counts are fresh (read less than ``replica_ttl_s`` ago)."""
        self._others_until = 0.0
        """clock() time after which the others' counts are too old to use."""
        self._publish = LuaScript(_PUBLISH)
        self._withdraw = LuaScript(_WITHDRAW)
        self._client: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
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

    def acquire_tenant(self, tenant: str) -> None:
        self._local.acquire_tenant(tenant)

    def release_tenant(self, tenant: str) -> None:
        self._local.release_tenant(tenant)

    def tenant_load(self, tenant: str) -> int:
        local = self._local.tenant_load(tenant)
        return local + self._tenant_others.get(tenant, 0) if self._fresh() else local

    def local_tenant_load(self, tenant: str) -> int:
        return self._local.tenant_load(tenant)

    def tenant_loads(self) -> dict[str, int]:
        """In-flight requests per tenant across every replica whose counts are fresh."""
        local = self._local.tenant_loads()
        if not self._fresh():
            return local
        merged = dict(self._tenant_others)
        for tenant, count in local.items():
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
        """True when the last publish reached Redis."""
        return self._available

    # lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Publish once and start publishing every interval; never fails if Redis is down."""
        self._client = redis_client(self._url, op_timeout_s=self._op_timeout, max_connections=2)
        await self.sync()
        self._task = asyncio.create_task(self._publish_forever(), name="redis-load-board")

    async def close(self, *, withdraw: bool = True) -> None:
        """Stop publishing; with ``withdraw`` (a clean shutdown), remove this replica's
        counts now rather than letting them expire."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is None:
            return
        if withdraw:
            try:
                async with asyncio.timeout(self._op_timeout):
                    await self._withdraw.run(self._client, self._tag, self.replica_id)
            except _FAILURES:
                log.info("load board: could not withdraw counts; they expire with the TTL")
        await self._client.aclose()
        self._client = None

    async def sync(self) -> bool:
        """Publish this replica's counts and read the others' now (one round trip).
        Returns False, without raising, when Redis cannot be reached."""
        if self._client is None:
            return False
        workers = self._local.loads()
        args: list[str] = [self._tag, self.replica_id, self._ttl_ms, str(len(workers))]
        for worker, count in workers.items():
            args += (worker, str(count))
        for tenant, count in self._local.tenant_loads().items():
            args += (tenant, str(count))
        try:
            async with asyncio.timeout(self._op_timeout):
                reply = await self._publish.run(self._client, *args)
        except _FAILURES as exc:
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

    async def _publish_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.sync()
            except Exception:
                # Never let a surprise end the task: this replica would stop counting.
                log.exception("load board: publish error")
