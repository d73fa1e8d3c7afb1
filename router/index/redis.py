"""The shared warm index: `MemoryWarmIndex`'s semantics, kept in one Redis for every replica.

A prefix one replica routed (or a worker confirmed) is warm for all of them. Key layout, all
under the hash tag ``{prefix}`` (``{pr}`` by default) so several deployments can share a Redis::

    {pr}:e:<worker>    hash  block hex -> expiry: "inf" when confirmed, else wall-clock seconds
    {pr}:w:<worker>    zset  block hex -> recency: the same blocks, in LRU order
    {pr}:h:<block hex> set   workers holding this block as the head of a recorded chain
    {pr}:hw:<worker>   set   the heads the worker holds (to clean ``h:`` on eviction)
    {pr}:workers       set   workers with entries (stats; remove of unknown workers)
    {pr}:seq           int   recency counter shared by all replicas

Why per worker rather than per block: a lookup needs, for each worker holding the chain's
head, the length of the leading run of the chain it holds. ``h:`` gives those candidates in one
probe; each one's run is read with ``HMGET`` on its ``e:`` hash (presence and expiry in one
field) over doubling slices of the chain: about one field read per block of each run, as in
the memory index. Writes are bulk (one ``HSET``/``ZADD`` per record, whatever its length), so
Redis runs a handful of commands per request, not one per block, and `clear` costs the
worker's heads, not its blocks. Every router lookup starts at block 0 of a prompt (a root
seeded by the tenant scope); a KV-event sidecar recording continuations of a chain relies on
the head its worker already holds. A lookup starting mid-chain would miss workers holding that
block deeper in a longer chain (the memory index finds them); no caller does that.

LRU: a chain is recorded tail first with increasing recency, so its head is the most recent and
evicted last (a chain without its head is worth nothing). The recency counter is an ``INCRBY``
in Redis, so replicas agree on LRU order exactly; ``capacity_blocks`` is applied by the
recording replica (give every replica the same). Predicted expiry compares against the ``now``
the caller passes: replicas' clocks agree to well under the TTL.

Tenants: chain hashes are already tenant-scoped (the root is seeded by the tenant scope, or by
the ``cache_salt`` in exact mode), so one tenant's chain never matches another tenant's keys.

Deployment: one Redis >= 6.2 (``SMISMEMBER``); not Redis Cluster, since the scripts build key
names from their arguments (all keys share one hash tag anyway). Each operation is one round
trip: an ``EVALSHA``, atomic, so no replica sees a half-recorded chain. After a Redis restart
the first ``NOSCRIPT`` reloads the scripts and retries within the same deadline.

Fail-open: any Redis error or timeout marks the index down and raises `IndexUnavailable`; the
router then routes by ring alone. ``op_timeout_s`` bounds every call: an `asyncio.timeout`
around it, plus connect and pool-wait timeouts (`redis_client` says why reads and writes have
no socket timeout of their own). While down, calls raise at once without touching the network;
after an exponential backoff (``backoff_base_s`` doubling up to ``backoff_max_s``) the task
started by `start` probes Redis (PING, load the scripts) and brings the index back up; without
`start`, the first call after the backoff is the probe.

Memory: about 220 bytes per (worker, block) held (measured with load_tests/bench_index.py),
so 64 workers x 100k blocks is about 1.4 GB. Size ``capacity_blocks`` to the workers' KV
caches, not larger.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from router.core.model import BlockHash, WorkerId
from router.errors import IndexUnavailable
from router.index import Source

log = logging.getLogger("prefix_router.index")

_FAILURES = (RedisError, OSError, TimeoutError)
"""What marks Redis down: protocol or connection errors, socket errors, our own deadline."""

# Shared by the scripts: split the chain (16 hex digits per block, on demand); run bulk
# commands in slices small enough for Lua's unpack() limit; read a worker's expiry hash over a
# slice of blocks. A small hash, which Redis keeps as a listpack scanned linearly for every
# field asked, is read whole once; a large one (a hash table) is probed with HMGET.
_LUA_PRELUDE = """
local function extend(blocks, hex, upto)
  for i = #blocks + 1, upto do blocks[i] = string.sub(hex, 16 * i - 15, 16 * i) end
  return blocks
end
local function bulk(cmd, key, list)
  for i = 1, #list, 1000 do
    redis.call(cmd, key, unpack(list, i, math.min(i + 999, #list)))
  end
end
local SMALL = 128
local function expiry_reader(key)
  local size = redis.call('HLEN', key)
  if size == 0 then
    return function(list, i, j) return {} end
  end
  if size <= SMALL then
    local all, flat = {}, redis.call('HGETALL', key)
    for k = 1, #flat, 2 do all[flat[k]] = flat[k + 1] end
    return function(list, i, j)
      local out = {}
      for k = i, j do out[k - i + 1] = all[list[k]] or false end
      return out
    end
  end
  return function(list, i, j) return redis.call('HMGET', key, unpack(list, i, j)) end
end
"""

# ARGV: tag, now, chain hex. Returns {worker, depth, ...} for every worker with depth >= 1.
# Candidates are the workers holding the chain's head; each one's run is read in doubling
# slices (and the chain split only as far as needed), so a run that ends early costs little.
_LOOKUP = (
    _LUA_PRELUDE
    + """
local tag, now, hex = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local n = #hex / 16
local blocks = extend({}, hex, 1)
local out = {}
for _, w in ipairs(redis.call('SMEMBERS', tag .. ':h:' .. blocks[1])) do
  local read = expiry_reader(tag .. ':e:' .. w)
  local depth, size = 0, 64
  while depth < n do
    local last = math.min(n, depth + size)
    local expiry = read(extend(blocks, hex, last), depth + 1, last)
    local run = 0
    for j = 1, last - depth do
      local e = expiry[j]
      if not e or (e ~= 'inf' and tonumber(e) <= now) then break end
      run = j
    end
    depth = depth + run
    if depth < last then break end
    size = math.min(size * 2, 1024)
  end
  if depth > 0 then
    out[#out + 1] = w
    out[#out + 1] = depth
  end
end
return out
"""
)

# Forget worker w's blocks in `list` everywhere but its LRU zset (the caller removes them
# there): their expiries, and the head entries of those that were heads.
_LUA_FORGET = """
local function forget(tag, w, list)
  if #list == 0 then return end
  bulk('HDEL', tag .. ':e:' .. w, list)
  local hwkey = tag .. ':hw:' .. w
  for i = 1, #list, 1000 do
    local last = math.min(i + 999, #list)
    local heads = redis.call('SMISMEMBER', hwkey, unpack(list, i, last))
    for j = 1, last - i + 1 do
      if heads[j] == 1 then
        redis.call('SREM', tag .. ':h:' .. list[i + j - 1], w)
        redis.call('SREM', hwkey, list[i + j - 1])
      end
    end
  end
end
"""

# ARGV: tag, worker, expiry ("inf" when confirmed), capacity, chain hex. Returns the worker's
# block count. Never shortens an expiry (a prediction does not demote a confirmed block), then
# evicts the least recent blocks beyond capacity.
_RECORD = (
    _LUA_PRELUDE
    + _LUA_FORGET
    + """
local tag, w, expiry, cap, hex = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local n = #hex / 16
local blocks = extend({}, hex, n)
local zkey, ekey = tag .. ':w:' .. w, tag .. ':e:' .. w
local fields = {}
if expiry == 'inf' then
  for i = 1, n do
    fields[2 * i - 1] = blocks[i]
    fields[2 * i] = 'inf'
  end
else
  local until_n = tonumber(expiry)
  local read = expiry_reader(ekey)
  for i = 1, n, 1000 do
    local last = math.min(i + 999, n)
    local current = read(blocks, i, last)
    for j = 1, last - i + 1 do
      local e = current[j]
      if not e or (e ~= 'inf' and tonumber(e) < until_n) then
        fields[#fields + 1] = blocks[i + j - 1]
        fields[#fields + 1] = expiry
      end
    end
  end
end
if #fields > 0 then bulk('HSET', ekey, fields) end
-- Tail first: the head gets the highest recency, so it is evicted last.
local top = redis.call('INCRBY', tag .. ':seq', n)
local ranked = {}
for i = 1, n do
  ranked[2 * i - 1] = top - i + 1
  ranked[2 * i] = blocks[i]
end
bulk('ZADD', zkey, ranked)
redis.call('SADD', tag .. ':h:' .. blocks[1], w)
redis.call('SADD', tag .. ':hw:' .. w, blocks[1])
redis.call('SADD', tag .. ':workers', w)
local count = redis.call('ZCARD', zkey)
if count > cap then
  local victims = redis.call('ZRANGE', zkey, 0, count - cap - 1)
  redis.call('ZREMRANGEBYRANK', zkey, 0, count - cap - 1)
  forget(tag, w, victims)
  count = cap
end
return count
"""
)

# ARGV: tag, worker, hex of the blocks. Returns the worker's block count left, or -1 for a
# worker the index does not know (so stats do not grow an entry for it).
_REMOVE = (
    _LUA_PRELUDE
    + _LUA_FORGET
    + """
local tag, w, hex = ARGV[1], ARGV[2], ARGV[3]
if redis.call('SISMEMBER', tag .. ':workers', w) == 0 then return -1 end
local blocks = extend({}, hex, #hex / 16)
local zkey = tag .. ':w:' .. w
bulk('ZREM', zkey, blocks)
forget(tag, w, blocks)
return redis.call('ZCARD', zkey)
"""
)

# ARGV: tag, worker. Costs the worker's number of heads, not of blocks.
_CLEAR = """
local tag, w = ARGV[1], ARGV[2]
local hwkey = tag .. ':hw:' .. w
for _, head in ipairs(redis.call('SMEMBERS', hwkey)) do
  redis.call('SREM', tag .. ':h:' .. head, w)
end
redis.call('DEL', tag .. ':w:' .. w, tag .. ':e:' .. w, hwkey)
redis.call('SREM', tag .. ':workers', w)
return 1
"""

# ARGV: tag. Returns {worker, blocks, ...}.
_STATS = """
local tag = ARGV[1]
local out = {}
for _, w in ipairs(redis.call('SMEMBERS', tag .. ':workers')) do
  out[#out + 1] = w
  out[#out + 1] = redis.call('ZCARD', tag .. ':w:' .. w)
end
return out
"""


class LuaScript:
    """A Lua script run by ``EVALSHA``, loaded again once when Redis answers ``NOSCRIPT``.

    The scripts here take no KEYS (they build key names from ARGV), hence numkeys 0.
    """

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def run(self, client: aioredis.Redis, *args: str) -> Any:
        try:
            return await client.evalsha(self.sha, 0, *args)
        except NoScriptError:
            # Redis restarted (or SCRIPT FLUSH): load once and retry, in the caller's deadline.
            await client.script_load(self.source)
            return await client.evalsha(self.sha, 0, *args)


def redis_client(url: str, *, op_timeout_s: float, max_connections: int) -> aioredis.Redis:
    """A client for calls that each run under the caller's ``asyncio.timeout(op_timeout_s)``.

    Connecting and waiting for a pooled connection are bounded by ``op_timeout_s`` at the
    socket and pool level too. Reads and writes deliberately have no socket timeout: with one,
    redis-py sends through ``asyncio.wait_for``, which on Python 3.11 swallows a cancellation
    arriving as the send completes (measured: nearly every cancel of a task in a command), so
    both the caller's deadline and a shutdown's cancel could be lost and a call outlive its
    deadline; the caller's ``asyncio.timeout`` alone bounds them, and a cancelled read closes
    its connection. A command is retried once, at once, on a fresh connection (a pooled socket
    that died with a Redis restart), never with a backoff: callers fail open instead.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=op_timeout_s,
        socket_timeout=None,
        socket_connect_timeout=op_timeout_s,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 1),
        client_name="prefix-router",
    )
    return aioredis.Redis.from_pool(pool)


def chain_hex(chain: Iterable[BlockHash]) -> str:
    """Block hashes as one string of 16 hex digits each (big-endian), as the scripts split it."""
    blocks = tuple(chain)
    return struct.pack(f">{len(blocks)}Q", *blocks).hex()


def _pairs(flat: Sequence[Any]) -> dict[WorkerId, int]:
    return {WorkerId(flat[i].decode()): int(flat[i + 1]) for i in range(0, len(flat), 2)}


class RedisWarmIndex:
    """`WarmIndex` in Redis, shared by every router replica; fails open (see module doc)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "pr",
        capacity_blocks: int,
        predicted_ttl_s: float,
        op_timeout_s: float = 0.25,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 10.0,
        stats_interval_s: float = 1.0,
        max_connections: int = 64,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if capacity_blocks < 1:
            raise ValueError("capacity_blocks must be >= 1")
        if not 0 < backoff_base_s <= backoff_max_s or op_timeout_s <= 0:
            raise ValueError("need op_timeout_s > 0 and 0 < backoff_base_s <= backoff_max_s")
        self._url = url
        self._tag = "{" + prefix + "}"
        self._capacity = capacity_blocks
        self._worker_capacity: dict[WorkerId, str] = {}
        self._ttl = predicted_ttl_s
        self._op_timeout = op_timeout_s
        self._backoff_base = backoff_base_s
        self._backoff_max = backoff_max_s
        self._stats_interval = stats_interval_s
        self._max_connections = max_connections
        self._clock = clock
        self._lookup = LuaScript(_LOOKUP)
        self._record = LuaScript(_RECORD)
        self._remove = LuaScript(_REMOVE)
        self._clear = LuaScript(_CLEAR)
        self._count = LuaScript(_STATS)
        self._scripts = (self._lookup, self._record, self._remove, self._clear, self._count)
        self._client: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stats: dict[WorkerId, int] = {}
        self._writes = 0
        """Writes by this replica; a refresh that overlapped one is stale and dropped."""
        self._down = False
        self._failures = 0
        self._retry_at = 0.0
        """time.monotonic() from which Redis may be tried again. Backoff runs on real time,
        apart from the injected clock, which only decides predicted expiry."""

    # lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and load the scripts; never fails: a down Redis starts the index down."""
        if not await self._probe():
            log.warning("warm index: Redis unreachable at start; retrying in the background")
        self._task = asyncio.create_task(self._maintain(), name="redis-warm-index")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def available(self) -> bool:
        """False while Redis is down: calls fail fast with `IndexUnavailable`."""
        return not self._down

    # WarmIndex ---------------------------------------------------------------------------
    async def lookup(self, chain: Sequence[BlockHash]) -> dict[WorkerId, int]:
        if not chain:
            return {}
        flat = await self._run(self._lookup, self._tag, repr(self._clock()), chain_hex(chain))
        return _pairs(flat)

    async def record(self, worker: WorkerId, chain: Sequence[BlockHash], source: Source) -> None:
        if not chain:
            return
        expiry = "inf" if source == "confirmed" else repr(self._clock() + self._ttl)
        blocks = chain_hex(chain)
        capacity = self._worker_capacity.get(worker) or str(self._capacity)
        count = await self._run(self._record, self._tag, worker, expiry, capacity, blocks)
        self._stats[worker] = int(count)
        self._writes += 1

    async def remove(self, worker: WorkerId, hashes: Iterable[BlockHash]) -> None:
        blocks = chain_hex(hashes)
        if not blocks:
            return
        left = int(await self._run(self._remove, self._tag, worker, blocks))
        if left >= 0:
            self._stats[worker] = left
        self._writes += 1

    async def clear(self, worker: WorkerId) -> None:
        await self._run(self._clear, self._tag, worker)
        self._stats.pop(worker, None)
        self._writes += 1

    def set_capacity(self, worker: WorkerId, blocks: int) -> None:
        self._worker_capacity[worker] = str(max(1, min(blocks, self._capacity)))

    def stats(self) -> dict[WorkerId, int]:
        """Blocks per worker as of this replica's last operation or background refresh (every
        ``stats_interval_s``: other replicas' writes show up by then)."""
        return dict(self._stats)

    async def refresh_stats(self) -> dict[WorkerId, int]:
        """Read every worker's block count now (one round trip)."""
        writes = self._writes
        counts = _pairs(await self._run(self._count, self._tag))
        if writes == self._writes:
            self._stats = dict(counts)
        return counts

    # fail-open machinery -----------------------------------------------------------------
    def _connection(self) -> aioredis.Redis:
        if self._client is None:
            self._client = redis_client(
                self._url, op_timeout_s=self._op_timeout, max_connections=self._max_connections
            )
        return self._client

    async def _run(self, script: LuaScript, *args: str) -> Any:
        prober = self._task is not None and not self._task.done()
        if self._down and (prober or time.monotonic() < self._retry_at):
            # Fail fast while down. The background task probes once the backoff is over;
            # without one, the first call after the backoff is the probe.
            raise IndexUnavailable("warm index unavailable (Redis down, backing off)")
        client = self._connection()
        try:
            async with asyncio.timeout(self._op_timeout):
                result = await script.run(client, *args)
        except _FAILURES as exc:
            self._mark_down(exc)
            raise IndexUnavailable(f"warm index unavailable: {exc!r}") from exc
        if self._down:
            self._mark_up()
        return result

    def _mark_down(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._down and now < self._retry_at:
            return  # the same outage, seen by a concurrent call: count it once
        self._failures += 1
        delay = min(self._backoff_base * 2 ** (self._failures - 1), self._backoff_max)
        self._retry_at = now + delay
        if not self._down:
            log.warning("warm index: Redis down (%r); routing by ring only", exc)
        self._down = True
        self._wake.set()

    def _mark_up(self) -> None:
        if self._down:
            log.info("warm index: Redis back after %d failed attempts", self._failures)
        self._down = False
        self._failures = 0
        self._retry_at = 0.0

    async def _probe(self) -> bool:
        """PING and load every script on fresh connections; True if Redis is usable again."""
        client = self._connection()
        try:
            async with asyncio.timeout(self._op_timeout):
                # Sockets opened before an outage may be half dead: start from fresh ones.
                await client.connection_pool.disconnect()
                async with client.pipeline(transaction=False) as pipe:
                    pipe.ping()
                    for script in self._scripts:
                        pipe.script_load(script.source)
                    await pipe.execute()
        except _FAILURES as exc:
            self._mark_down(exc)
            return False
        self._mark_up()
        return True

    async def _maintain(self) -> None:
        """While down, probe after each backoff; while up, refresh `stats` now and then."""
        while True:
            if self._down:
                delay = max(0.0, self._retry_at - time.monotonic())
            else:
                delay = self._stats_interval
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            try:
                if self._down:
                    if time.monotonic() >= self._retry_at:
                        await self._probe()
                else:
                    await self.refresh_stats()
            except IndexUnavailable:
                pass
            except Exception:
                # Never let a surprise end the task: the index would stay down for good.
                log.exception("warm index: background task error")
