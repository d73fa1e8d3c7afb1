"""Everything one router process owns, reached from handlers through one typed `AppKey`."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from router.config import Settings, TuningState
from router.index import WarmIndex
from router.proxy import Forwarder
from router.routing import Router
from router.telemetry import Metrics
from router.tenants import TenantResolver
from router.upstream import Upstream
from router.workers import WorkerPool


@dataclass(slots=True)
class RouterState:
    settings: Settings
    tuning: TuningState
    tenants: TenantResolver
    pool: WorkerPool
    index: WarmIndex
    router: Router
    upstream: Upstream
    forwarder: Forwarder
    metrics: Metrics
    draining: bool = False
    """Set on SIGTERM: /ready answers 503 and new inference requests are refused."""


STATE = web.AppKey("prefix_router_state", RouterState)
