"""Everything one router process owns, reached from handlers through one typed `AppKey`."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from router.config import Settings, TuningState
from router.discovery import DnsDiscovery, Membership
from router.index import WarmIndex
from router.lifecycle import InFlight
from router.proxy import Forwarder
from router.reload import Reloader
from router.routing import Router
from router.shared_tuning import SharedTuning
from router.telemetry import Metrics, Tracing
from router.tenants import TenantGate, TenantResolver
from router.upstream import Upstream
from router.workers import WorkerPool


@dataclass(slots=True)
class RouterState:
    settings: Settings
    """The running settings; a reload swaps in a new tree with its live fields changed."""
    tuning: TuningState
    tenants: TenantResolver
    pool: WorkerPool
    index: WarmIndex
    router: Router
    upstream: Upstream
    forwarder: Forwarder
    metrics: Metrics
    tracing: Tracing
    membership: Membership
    discovery: DnsDiscovery | None = None
    """Set with ``discovery.kind: dns``; its task is owned by the app's cleanup context."""
    shared_tuning: SharedTuning | None = None
    """Set when the live thresholds are shared through Redis (`Settings.shares_tuning`)."""
    inflight: InFlight = field(default_factory=InFlight)
    """Inference requests in progress (a shutdown waits for them)."""
    tenant_gate: TenantGate = field(init=False)
    """Each tenant's inference requests in flight (``tenants.max_concurrent_per_tenant``),
    counted on the router's load board, so they are fleet-wide when the loads are shared."""
    draining: bool = False
    """Set on SIGTERM: /ready answers 503 and new inference requests are refused."""
    reloader: Reloader = field(init=False)
    """Set right after construction (it needs the state itself)."""

    def __post_init__(self) -> None:
        self.tenant_gate = TenantGate(self.router.loads)


STATE = web.AppKey("prefix_router_state", RouterState)
