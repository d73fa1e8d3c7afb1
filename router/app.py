"""Builds the aiohttp application: state, routes, error middleware, owned resources.

``create_app(settings, *, index=None, loads=None, upstream=None, ...)`` is the seam tests
and embedders use: pass another `WarmIndex`, `LoadBoard` or `Upstream` to replace the
defaults, a `Tracing` (say, into an in-memory exporter) instead of the one the ``OTEL_*``
variables describe, a DNS `Resolver` for discovery, and the `SettingsLoader` that a reload
calls to read the settings again. Every resource the app opens (the client session, the
health prober, DNS discovery, the reload task, the trace exporter) is opened and closed by
one ``cleanup_ctx`` generator.

The admin routes are on the public app only when `ServerSettings.admin_public` says so;
`create_admin_app` builds the app for the separate admin listener (``server.admin_port``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from router.admin import add_admin_routes
from router.config import Settings, TuningState, otel_env
from router.discovery import DnsDiscovery, Membership, Resolver
from router.errors import (
    MalformedRequest,
    MethodNotAllowed,
    NotFound,
    RouterError,
    ShuttingDown,
    error_body,
)
from router.handlers import INSIGHTS, add_routes
from router.index import WarmIndex
from router.index.memory import MemoryWarmIndex
from router.index.redis import RedisWarmIndex
from router.insights import InsightsRecorder
from router.loads import LoadBoard, LocalLoadBoard, RedisLoadBoard, default_replica_id
from router.proxy import Forwarder
from router.reload import STATIC_SOURCE, Reloader, SettingsLoader
from router.routing import Router
from router.shared_tuning import SharedTuning
from router.state import STATE, RouterState
from router.tasks import cancel_and_wait
from router.telemetry import Metrics, Tracing
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
        response = web.json_response(exc.body(), status=exc.status, headers=exc.headers())
        if isinstance(exc, ShuttingDown):
            # The client's next request should open a connection to another replica.
            response.force_close()
        return response
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
    except web.RequestPayloadError:
        # The body's framing or Content-Encoding broke while the handler read it (a client
        # error, not a router one); the rest of the connection's bytes cannot be trusted.
        error = MalformedRequest(
            "malformed HTTP request: the body's chunked encoding or Content-Encoding is invalid"
        )
        response = web.json_response(error.body(), status=error.status)
        response.force_close()
        return response
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
    loads: LoadBoard | None = None,
    upstream: Upstream | None = None,
    tracing: Tracing | None = None,
    resolver: Resolver | None = None,
    settings_loader: SettingsLoader | None = None,
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
    upstream = upstream or Upstream(settings.upstream)
    tuning = TuningState(settings.routing.tuning())
    router = Router(
        settings,
        tuning,
        pool,
        index if index is not None else make_index(settings),
        loads if loads is not None else make_loads(settings),
        metrics,
    )
    membership = Membership(pool, router.index, metrics)
    membership.adopt(STATIC_SOURCE, settings.workers)
    state = RouterState(
        settings=settings,
        tuning=tuning,
        tenants=TenantResolver(settings.tenants),
        pool=pool,
        index=router.index,
        router=router,
        upstream=upstream,
        forwarder=Forwarder(router, upstream, metrics, headers_on=settings.server.decision_headers),
        metrics=metrics,
        tracing=tracing if tracing is not None else Tracing.from_env(otel_env()),
        membership=membership,
        discovery=DnsDiscovery(settings.discovery, membership, metrics, resolver)
        if settings.discovery.kind == "dns"
        else None,
    )
    state.reloader = Reloader(state, settings_loader)
    if settings.shares_tuning:
        state.shared_tuning = make_shared_tuning(state)
    app = web.Application(
        middlewares=[error_middleware], client_max_size=settings.server.max_body_bytes
    )
    app[STATE] = state
    app[INSIGHTS] = make_insights(settings)
    add_routes(app)
    if settings.server.admin_public:
        add_admin_routes(app)
    app.cleanup_ctx.append(_resources)
    return app


def create_admin_app(app: web.Application) -> web.Application:
    """The admin routes alone, sharing ``app``'s state, for the `server.admin_port` listener.

    Serve it only while ``app`` runs: ``app``'s cleanup context owns the shared resources."""
    state = app[STATE]
    admin = web.Application(
        middlewares=[error_middleware], client_max_size=state.settings.server.max_body_bytes
    )
    admin[STATE] = state
    admin[INSIGHTS] = app[INSIGHTS]
    add_admin_routes(admin)
    return admin


def make_insights(settings: Settings) -> InsightsRecorder | None:
    """The insights recorder (`insights.enabled`); it reuses the routing chain when routing
    hashes with the approximate hasher, whose blocks are the advisor's."""
    if not settings.insights.enabled:
        return None
    return InsightsRecorder(
        settings.insights,
        route_header=settings.server.route_header,
        block_chars=settings.routing.block_chars,
        routing_chain_matches=settings.routing.hasher == "approx",
    )


def _redis_url(settings: Settings) -> str:
    url = settings.redis.url
    assert url is not None, "validated by Settings"
    return url.get_secret_value()


def make_index(settings: Settings) -> WarmIndex:
    """The warm index the settings ask for (`index.kind`)."""
    if settings.index.kind == "redis":
        return RedisWarmIndex(
            _redis_url(settings),
            prefix=settings.redis.prefix,
            capacity_blocks=settings.index.capacity_blocks,
            predicted_ttl_s=settings.index.predicted_ttl_s,
            op_timeout_s=settings.redis.op_timeout_s,
        )
    return MemoryWarmIndex(settings.index.capacity_blocks, settings.index.predicted_ttl_s)


def make_shared_tuning(state: RouterState) -> SharedTuning:
    """Live thresholds shared through Redis (`router.shared_tuning`), known to the fleet by
    the load board's replica id when the loads are shared too."""
    settings = state.settings
    loads = state.router.loads
    return SharedTuning(
        _redis_url(settings),
        state.tuning,
        lambda: state.settings.routing.tuning(),
        replica_id=loads.replica_id if isinstance(loads, RedisLoadBoard) else default_replica_id(),
        prefix=settings.redis.prefix,
        poll_interval_s=settings.redis.tuning_poll_s,
        op_timeout_s=settings.redis.op_timeout_s,
        on_version=state.metrics.tuning_version.set,
    )


def make_loads(settings: Settings) -> LoadBoard:
    """The load board the settings ask for (`loads.kind`)."""
    if settings.loads.kind == "redis":
        return RedisLoadBoard(
            _redis_url(settings),
            prefix=settings.redis.prefix,
            publish_interval_s=settings.loads.publish_interval_s,
            replica_ttl_s=settings.loads.replica_ttl_s,
            op_timeout_s=settings.redis.op_timeout_s,
        )
    return LocalLoadBoard()


async def _resources(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    await state.upstream.start()
    await state.index.start()
    await state.router.loads.start()
    if state.shared_tuning is not None:
        await state.shared_tuning.start()
    tasks = [
        asyncio.create_task(
            probe_forever(state.router, state.upstream, state.settings.health),
            name="health-prober",
        ),
        asyncio.create_task(state.reloader.run_forever(), name="settings-reload"),
    ]
    if state.discovery is not None:
        # The first members before the first request (bounded by discovery.interval_s).
        try:
            await state.discovery.refresh()
        except Exception:
            log.exception("first DNS discovery round failed; retrying in the background")
        tasks.append(asyncio.create_task(state.discovery.run_forever(), name="dns-discovery"))
    try:
        yield
    finally:
        await cancel_and_wait(*tasks)
        if state.shared_tuning is not None:
            await state.shared_tuning.close()
        await state.router.loads.close()
        await state.index.close()
        await state.upstream.close()
        await state.tracing.close()
