"""The Redis load board's tenant counts and exact admission, board against board (no router):
replicas share only busy tenants' counts, many tenants fit one publish, the others' counts are
trusted for the TTL then dropped, an admission is exact across boards and a freed slot is seen at
once, a late publish never erases an admission, a refused admission takes itself back out, a
Redis too slow for its deadline is decided on the estimate, and what an admission costs.
(`test_tenant_limit_shared.py` has the same limit through router replicas.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from load_tests.redis_server import RedisServer
from router.core.model import WorkerId
from router.index.redis import LuaScript
from router.load_scripts import ADMIT, PUBLISH
from router.loads import Admission, RedisLoadBoard
from tests.integration.conftest import Boards, apoll, redis_dump


async def sync_all(*boards: RedisLoadBoard) -> None:
    """Publish and read on each board in turn, failing if one cannot reach Redis."""
    for board in boards:
        assert await board.sync(), board.replica_id


@pytest.fixture
def make_board(redis_boards: Boards) -> Boards:
    async def make(replica_id: str, **options: Any) -> RedisLoadBoard:
        # A long interval: these tests publish with sync() when they mean to.
        settings = {"publish_interval_s": 30.0, "replica_ttl_s": 60.0, **options}
        return await redis_boards(replica_id, **settings)

    return make


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
