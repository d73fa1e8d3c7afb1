"""Loads shared across router replicas through a real redis-server: each replica sees the
others' in-flight requests, a dead replica's counts expire, and a Redis outage leaves every
replica working on its own counts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from load_tests.redis_server import RedisServer
from router.core.model import WorkerId
from router.loads import RedisLoadBoard
from tests.integration.conftest import Boards

W0, W1 = WorkerId("w0"), WorkerId("w1")


@pytest.fixture
def make_board(redis_boards: Boards) -> Boards:
    async def make(replica_id: str, **options: float) -> RedisLoadBoard:
        settings = {"publish_interval_s": 0.02, "replica_ttl_s": 0.5, **options}
        return await redis_boards(replica_id, **settings)

    return make


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``condition`` while the boards publish in the background; fail after ``within``."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.01)


async def test_replicas_see_each_others_loads(make_board: Boards) -> None:
    """Requests in flight through one replica count on the other replica's loads too."""
    first, second = await make_board("r1"), await make_board("r2")
    first.acquire(W0)
    first.acquire(W0)
    second.acquire(W0)
    second.acquire(W1)
    expected = {W0: 3, W1: 1}
    await until(lambda: first.loads() == expected and second.loads() == expected)
    assert first.load(W0) == second.load(W0) == 3
    assert first.local_loads() == {W0: 2}
    first.release(W0)
    first.release(W0)
    await until(lambda: second.loads() == {W0: 1, W1: 1})
    assert first.available
    assert second.available


async def test_a_crashed_replicas_counts_expire(make_board: Boards) -> None:
    """A replica that stops publishing without cleaning up stops counting within its TTL."""
    survivor, doomed = await make_board("r1"), await make_board("r2", replica_ttl_s=0.3)
    doomed.acquire(W0)
    await until(lambda: survivor.load(W0) == 1)
    await doomed.close(withdraw=False)
    await until(lambda: survivor.load(W0) == 0, within=3.0)


async def test_a_cleanly_closed_replica_withdraws_at_once(make_board: Boards) -> None:
    """A replica shut down cleanly removes its counts without waiting for the TTL."""
    survivor = await make_board("r1")
    leaving = await make_board("r2", replica_ttl_s=60.0)
    leaving.acquire(W1)
    await until(lambda: survivor.load(W1) == 1)
    await leaving.close()
    await until(lambda: survivor.load(W1) == 0, within=1.0)


async def test_redis_down_leaves_local_counts_working(
    make_board: Boards, redis_server: RedisServer
) -> None:
    """With Redis down, each replica keeps counting its own requests, drops the others' stale
    counts after their TTL, and shares again once Redis is back."""
    first, second = await make_board("r1"), await make_board("r2")
    second.acquire(W1)
    await until(lambda: first.load(W1) == 1)
    redis_server.stop()
    first.acquire(W0)
    first.acquire(W0)
    first.release(W0)
    assert first.load(W0) == 1
    await until(lambda: not first.available and not second.available)
    await until(lambda: first.loads() == {W0: 1} and second.loads() == {W1: 1})
    redis_server.start()
    await until(lambda: first.loads() == second.loads() == {W0: 1, W1: 1})
    assert first.available
    assert second.available
