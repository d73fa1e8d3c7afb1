"""Builds the aiohttp application: state, routes, error middleware, owned resources.

``create_app(settings, *, index=None, upstream=None)`` is the seam tests and embedders use:
pass another `WarmIndex` or `Upstream` to replace the defaults. Every resource the app opens
(the client session, the health prober) is opened and closed by one ``cleanup_ctx`` generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from router.admin import add_admin_routes
from router.config import Settings, TuningState
from router.errors import MethodNotAllowed, NotFound, RouterError, error_body
from router.handlers import add_routes
from router.index import WarmIndex
from router.index.memory import MemoryWarmIndex
from router.proxy import Forwarder
from router.routing import Router
from router.state import STATE, RouterState
from router.telemetry import Metrics
from router.tenants import TenantResolver
from router.upstream import Upstream, probe_forever
from router.workers import Worker, WorkerPool

log = logging.getLogger("prefix_router.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RouterError as exc:
        return web.json_response(exc.body(), status=exc.status)
    except web.HTTPNotFound:
        error: RouterError = NotFound(f"no route {request.method} {request.path}")
        return web.json_response(error.body(), status=error.status)
    except web.HTTPMethodNotAllowed:
        error = MethodNotAllowed(f"method {request.method} not allowed on {request.path}")
        return web.json_response(error.body(), status=error.status)
    except web.HTTPException as exc:
        if exc.status >= 400:
            body = error_body(exc.reason, "invalid_request_error", exc.status)
            return web.json_response(body, status=exc.status)
        raise
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("unhandled error", extra={"fields": {"path": request.path}})
        body = error_body("internal router error", "server_error", 500)
        return web.json_response(body, status=500)


def create_app(
    settings: Settings,
    *,
    index: WarmIndex | None = None,
    upstream: Upstream | None = None,
) -> web.Application:
    metrics = Metrics(settings.telemetry)

    def on_eject(worker: Worker) -> None:
        metrics.ejections.labels(worker.id).inc()
        log.warning(
            "worker ejected",
            extra={"fields": {"worker": worker.id, "error": worker.last_error}},
        )

    pool = WorkerPool(
        settings.workers, settings.health, vnodes=settings.routing.vnodes, on_eject=on_eject
    )
    for worker in pool.members():
        metrics.worker_added(worker.id)
    if index is None:
        index = MemoryWarmIndex(settings.index.capacity_blocks, settings.index.predicted_ttl_s)
    upstream = upstream or Upstream(settings.upstream)
    tuning = TuningState(settings.routing.tuning())
    router = Router(settings, tuning, pool, index, metrics)
    state = RouterState(
        settings=settings,
        tuning=tuning,
        tenants=TenantResolver(settings.tenants),
        pool=pool,
        index=index,
        router=router,
        upstream=upstream,
        forwarder=Forwarder(router, upstream, metrics, headers_on=settings.server.decision_headers),
        metrics=metrics,
    )
    app = web.Application(
        middlewares=[error_middleware], client_max_size=settings.server.max_body_bytes
    )
    app[STATE] = state
    add_routes(app)
    add_admin_routes(app)
    app.cleanup_ctx.append(_resources)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    await state.upstream.start()
    prober = asyncio.create_task(
        probe_forever(state.pool, state.upstream, state.settings.health), name="health-prober"
    )
    try:
        yield
    finally:
        prober.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await prober
        await state.upstream.close()
