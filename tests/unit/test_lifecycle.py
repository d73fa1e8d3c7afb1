"""In-flight accounting for graceful shutdown: waiting for requests, and cutting them."""

from __future__ import annotations

import asyncio

from router.lifecycle import InFlight


async def test_wait_idle_returns_once_the_last_request_leaves() -> None:
    """A drain waiting on two requests finishes when both have left, not before."""
    inflight = InFlight()
    release = asyncio.Event()
    entered = asyncio.Event()

    async def request() -> None:
        inflight.enter()
        entered.set()
        try:
            await release.wait()
        finally:
            inflight.leave()

    tasks = [asyncio.create_task(request()) for _ in range(2)]
    await entered.wait()
    await asyncio.sleep(0)
    assert inflight.count == 2
    assert not await inflight.wait_idle(0.05)
    release.set()
    assert await inflight.wait_idle(5)
    await asyncio.gather(*tasks)
    assert inflight.count == 0


async def test_a_second_signal_cuts_the_wait_short() -> None:
    """The cut_short event ends the wait at once, reporting requests still in flight."""
    inflight = InFlight()
    hold = asyncio.Event()

    async def request() -> None:
        inflight.enter()
        try:
            await hold.wait()
        finally:
            inflight.leave()

    task = asyncio.create_task(request())
    await asyncio.sleep(0)
    hurry = asyncio.Event()
    hurry.set()
    assert not await inflight.wait_idle(30, hurry)
    assert inflight.cut() == 1
    assert await inflight.wait_idle(5)
    assert task.cancelled()


async def test_idle_from_the_start() -> None:
    """With nothing in flight, a drain is immediate."""
    assert await InFlight().wait_idle(0)
