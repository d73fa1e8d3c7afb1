"""Graceful shutdown: drain in-flight requests, then stop.

On SIGTERM (or SIGINT) the router

1. turns not-ready: ``/ready`` answers 503, so the load balancer stops sending new work;
2. keeps listening, but refuses new inference requests with 503 ``shutting_down`` and
   ``Connection: close`` (a client or ingress retries on another replica, instead of a
   connection refused it might not retry); ``/health``, ``/metrics`` and admin still answer;
3. waits until every in-flight inference request and stream has finished, at most
   ``server.shutdown_grace_s`` (read when the signal arrives, so a reload can change it);
4. cancels what still runs past the grace (a stream then ends with an OpenAI-style error
   event, code ``shutting_down``), closes the listener and the connections, releases what
   the app owns (pools, Redis, background tasks, the trace exporter, flushed) and exits 0.

A second signal skips the rest of the wait. In Kubernetes, give the pod a
``terminationGracePeriodSeconds`` above ``shutdown_grace_s`` plus any preStop delay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web

from router.tasks import cancel_and_wait

if TYPE_CHECKING:
    from router.state import RouterState

log = logging.getLogger("prefix_router.lifecycle")

CLOSE_TIMEOUT_S = 1.0
"""After the drain, how long requests still running (non-inference, or past the grace) get
before the server cancels them."""


class InFlight:
    """Inference requests in progress, so a shutdown can wait for them, or cut them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def count(self) -> int:
        return len(self._tasks)

    def enter(self) -> None:
        """Called by the handler's own task when it accepts an inference request."""
        task = asyncio.current_task()
        assert task is not None, "called from a request handler"
        self._tasks.add(task)
        self._idle.clear()

    def leave(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()

    def cut(self) -> int:
        """Cancel every request still in flight (a stream then ends with an error event)."""
        for task in self._tasks:
            task.cancel("the router is shutting down")
        return len(self._tasks)

    async def wait_idle(self, within_s: float, cut_short: asyncio.Event | None = None) -> bool:
        """True once nothing is in flight; False after ``within_s`` or when ``cut_short`` is set."""
        waiters = [asyncio.ensure_future(self._idle.wait())]
        if cut_short is not None:
            waiters.append(asyncio.ensure_future(cut_short.wait()))
        try:
            await asyncio.wait(waiters, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(*waiters)
        return self._idle.is_set()


async def drain_and_stop(
    runner: web.AppRunner, state: RouterState, cut_short: asyncio.Event | None = None
) -> bool:
    """Steps 1-4 above; True when every in-flight request finished within the grace."""
    grace = state.settings.server.shutdown_grace_s
    started = time.monotonic()
    state.draining = True
    log.info(
        "shutting down: not ready, refusing new requests, draining in-flight ones",
        extra={"fields": {"in_flight": state.inflight.count, "grace_s": grace}},
    )
    drained = await state.inflight.wait_idle(grace, cut_short)
    if drained:
        log.info("drained", extra={"fields": {"after_s": round(time.monotonic() - started, 3)}})
    else:
        log.warning(
            "shutdown grace over; cutting the requests still in flight",
            extra={"fields": {"in_flight": state.inflight.cut(), "grace_s": grace}},
        )
        await state.inflight.wait_idle(CLOSE_TIMEOUT_S)
    await runner.cleanup()
    return drained
