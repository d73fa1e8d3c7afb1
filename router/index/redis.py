"""The shared warm index: `MemoryWarmIndex`'s semantics, kept in one Redis for every replica.

A prefix one replica routed (or a worker confirmed) is warm for all of them. Key layout, all
under the hash tag ``{prefix}`` (``{pr}`` by default) so several deployments can share a Redis::

    {pr}:e:<worker>    hash  block hex -> expiry: "inf" when confirmed, else wall-clock seconds
    {pr}:c:<worker>    hash  marked block hex -> claim "gen length expiry"; "g" -> gen
    {pr}:w:<worker>    zset  block hex -> recency: the same blocks, in LRU order
    {pr}:h:<block hex> set   workers holding this block as the head of a recorded chain
    {pr}:hw:<worker>   set   the heads the worker holds (to clean ``h:`` on eviction)
    {pr}:workers       set   workers with entries (stats; remove of unknown workers)
    {pr}:seq           int   recency counter shared by all replicas

(``e:`` and ``c:`` also hold a field ``~`` with a long value, which keeps them in Redis's
hashtable encoding; see `router.index.redis_scripts`.)

Why per worker rather than per block: a lookup needs, for each worker holding the chain's
head, the length of the leading run of the chain it holds, exactly (it stops at the first
missing or expired block, as vLLM's prefix hit does). ``h:`` gives those candidates in one
probe. Reading every block of every candidate's run costs about 0.4 us per block inside Redis's
Lua, so six candidates over a 256-block prompt took half a millisecond; claims skip most of it.

Claims: a block is *marked* when its hash ends in four zero bits (one in 16, by content, so a
continuation recorded by a KV-event sidecar marks the same blocks as a whole chain). Each
record writes, on every marked block of its chain at 1-based position i, the claim "the i
blocks of this record up to here are held, none expiring before x" with the worker's current
gen. A claim whose length equals the block's position in a looked-up chain, whose gen is
current and whose x is in the future proves that whole prefix warm: chain hashes determine
their ancestors, so those i blocks are the chain's first i. It stays true because
(1) expiries only grow; (2) `remove` bumps the worker's gen, voiding all its claims; (3) LRU
cannot evict part of the run before the claimed block: every record touching a marked block
rewrites its claim, and a record stamps ancestors more recent than descendants, so while the
claim is the block's latest, its run is more recent than the block itself; (4) evicted and
removed blocks lose their claims. A lookup reads each candidate's claims at the chain's marks
(one ``HMGET``), takes the deepest valid one, and reads expiries only beyond it, up to the next
mark first, then in growing slices: about 16 + 16 fields per candidate instead of 256. Data
without claims (written before they existed) is read block by block as before, still exactly.
Writes are bulk (one ``HSET``/``ZADD`` per record, whatever its length), so
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

Upgrading: the claims only stay true if every writer maintains them; do not let a replica or
sidecar running the version without claims write the same prefix alongside this one.

Memory: about 220 bytes per (worker, block) held (measured with load_tests/bench_index.py
before claims; these add an entry for one block in 16),
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
from router.index import redis_scripts as scripts
from router.tasks import cancel_and_wait

log = logging.getLogger("prefix_router.index")

FAILURES = (RedisError, OSError, TimeoutError)
"""What marks Redis down: protocol or connection errors, socket errors, our own deadline."""


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


def chain_marks(hexes: str) -> str:
    """1-based positions of the marked blocks in ``chain_hex`` output, space-separated: those
    whose hash ends in four zero bits (about one in 16, chosen by content, not position)."""
    last_digits = hexes[15::16]
    marks: list[str] = []
    at = last_digits.find("0")
    while at >= 0:
        marks.append(str(at + 1))
        at = last_digits.find("0", at + 1)
    return " ".join(marks)


def _depths(reply: bytes) -> dict[WorkerId, int]:
    """Parse the lookup's reply: ``depth length worker`` triples, space-separated; the length
    (in bytes) lets a worker id hold any byte, spaces included."""
    depths: dict[WorkerId, int] = {}
    end, at = len(reply), 0
    while at < end:
        space = reply.index(b" ", at)
        size_end = reply.index(b" ", space + 1)
        name_at = size_end + 1
        after = name_at + int(reply[space + 1 : size_end])
        depths[WorkerId(reply[name_at:after].decode())] = int(reply[at:space])
        at = after + 1
    return depths


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
        self._lookup = LuaScript(scripts.LOOKUP)
        self._record = LuaScript(scripts.RECORD)
        self._remove = LuaScript(scripts.REMOVE)
        self._clear = LuaScript(scripts.CLEAR)
        self._count = LuaScript(scripts.STATS)
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
        await cancel_and_wait(self._task)
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
        hexes = chain_hex(chain)
        now = repr(self._clock())
        reply = await self._run(self._lookup, self._tag, now, hexes, chain_marks(hexes))
        return _depths(reply)

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
        except FAILURES as exc:
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
        except FAILURES as exc:
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
