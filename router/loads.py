"""In-flight requests per worker, counted across every router replica.

The bounded-load cap (DESIGN 3.3) must hold for the whole cluster, not per replica: with R
replicas each allowed ``cap`` on a worker, the worker could get R times its share. A
`LoadBoard` answers "how many requests are in flight on worker w, across all replicas".

- `LocalLoadBoard`: this process only (one replica; the default).
- `RedisLoadBoard`: this replica's exact counts plus the other replicas' last published ones.
  A background task publishes this replica's counts every ``publish_interval_s`` and reads
  the others' in the same round trip (one Lua script). Each replica's counts live in its own
  hash ``{prefix}:loads:r:<replica>`` whose TTL (``replica_ttl_s``) is refreshed by each
  publish, so a replica that dies stops counting within ``replica_ttl_s``; a clean `close`
  withdraws its counts at once. The set ``{prefix}:loads:replicas`` lists publishers and is
  pruned of replicas whose hash is gone.

The hot path (`acquire`, `release`, `load`, `loads`) never touches the network and never
raises: the others' counts are at most one publish interval plus one round trip old, which
the cap tolerates (it is a bound on spread, not an admission limit). If Redis is down the board
keeps retrying each interval; the others' last counts are trusted for ``replica_ttl_s`` after
the last successful read (as Redis itself would have kept them), then dropped, so the router
balances on its own counts alone rather than on stale ones. Counts are clamped at zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from router.core.model import WorkerId
from router.index.redis import LuaScript, redis_client

log = logging.getLogger("prefix_router.loads")


class LoadBoard(Protocol):
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


class LocalLoadBoard:
    """In-flight counts of this process only."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[WorkerId, int] = {}

    def acquire(self, worker: WorkerId) -> None:
        self._counts[worker] = self._counts.get(worker, 0) + 1

    def release(self, worker: WorkerId) -> None:
        count = self._counts.get(worker, 0)
        if count > 1:
            self._counts[worker] = count - 1
        else:
            # Clamp at zero: a release without its acquire (a bug elsewhere) must not make a
            # worker look emptier than idle and attract more than its share.
            self._counts.pop(worker, None)

    def load(self, worker: WorkerId) -> int:
        return self._counts.get(worker, 0)

    def loads(self) -> dict[WorkerId, int]:
        return dict(self._counts)

    @property
    def available(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


# ARGV: tag, replica id, ttl (ms), worker, count, worker, count, ...
# Replaces this replica's hash, refreshes its TTL, and returns the other live replicas'
# counts summed per worker: {worker, total, ...}. Replicas whose hash expired are pruned.
_PUBLISH = """
local tag, me, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local replicas = tag .. ':loads:replicas'
local mine = tag .. ':loads:r:' .. me
redis.call('DEL', mine)
if #ARGV > 3 then
  redis.call('HSET', mine, unpack(ARGV, 4))
  redis.call('PEXPIRE', mine, ttl)
end
redis.call('SADD', replicas, me)
local totals, order = {}, {}
for _, r in ipairs(redis.call('SMEMBERS', replicas)) do
  if r ~= me then
    local flat = redis.call('HGETALL', tag .. ':loads:r:' .. r)
    if #flat == 0 then
      redis.call('SREM', replicas, r)
    else
      for i = 1, #flat, 2 do
        local w = flat[i]
        if totals[w] == nil then
          totals[w] = 0
          order[#order + 1] = w
        end
        totals[w] = totals[w] + tonumber(flat[i + 1])
      end
    end
  end
end
local out = {}
for _, w in ipairs(order) do
  out[#out + 1] = w
  out[#out + 1] = totals[w]
end
return out
"""

# ARGV: tag, replica id. A clean shutdown withdraws this replica's counts at once.
_WITHDRAW = """
redis.call('DEL', ARGV[1] .. ':loads:r:' .. ARGV[2])
redis.call('SREM', ARGV[1] .. ':loads:replicas', ARGV[2])
return 1
"""

_FAILURES = (RedisError, OSError, TimeoutError)


def default_replica_id() -> str:
    """Host, pid and a random suffix: unique even when pids repeat across containers."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


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
        return self._local.load(worker) + self._fresh_others().get(worker, 0)

    def loads(self) -> dict[WorkerId, int]:
        return merge_loads(self._local.loads(), self._fresh_others())

    def local_loads(self) -> dict[WorkerId, int]:
        """This replica's own in-flight counts."""
        return self._local.loads()

    def others(self) -> dict[WorkerId, int]:
        """The other replicas' counts as last read, or nothing once they are too old."""
        return dict(self._fresh_others())

    def _fresh_others(self) -> dict[WorkerId, int]:
        if self._others and self._clock() > self._others_until:
            self._others = {}
        return self._others

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
        args: list[str] = [self._tag, self.replica_id, self._ttl_ms]
        for worker, count in self._local.loads().items():
            args += (worker, str(count))
        try:
            async with asyncio.timeout(self._op_timeout):
                flat = await self._publish.run(self._client, *args)
        except _FAILURES as exc:
            if self._available:
                log.warning("load board: Redis unreachable (%r); using local counts", exc)
            self._available = False
            return False
        if not self._available:
            log.info("load board: sharing loads through Redis as %s", self.replica_id)
        self._available = True
        self._others = {
            WorkerId(flat[i].decode()): max(0, int(flat[i + 1])) for i in range(0, len(flat), 2)
        }
        self._others_until = self._clock() + self._ttl
        return True

    async def _publish_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.sync()
            except Exception:
                # Never let a surprise end the task: this replica would stop counting.
                log.exception("load board: publish error")
