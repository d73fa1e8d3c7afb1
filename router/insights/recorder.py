"""The thin recorder between the request path and the pure insights core.

Per request the handler calls `InsightsRecorder.begin` once the tenant is known (it names
the route and decides whether this request's prompt shape is sampled) and `finish` once
the worker's usage came back (savings and versions: a few additions). For a sampled request
the handler then schedules `analyse` off the response path: it renders the prompt again
(`router.core.render`, the same text the router hashed), takes its chain (the routing chain
itself when routing uses the approximate hasher with the same blocks, else one computed
here), and hands both to the `ShapeAdvisor`. `snapshot` is the JSON of ``GET
/admin/insights``.

Sampling is systematic, not random, so tests are deterministic: each route and tenant's
first ``min_samples`` requests, then one in ``1 / sample_rate`` (a credit accumulates
``sample_rate`` per request and a sample spends 1). Routes and tenants are capped (first
come, the rest folded into ``other``), so every structure here has a fixed bound.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from router.config import InsightsSettings
from router.core.blocks import ApproxHasher, scope_key
from router.core.render import render_chat, render_completion
from router.insights.savings import Pricing, SavingsBook
from router.insights.shape import ShapeAdvisor, ShapeSample
from router.insights.versions import VersionTracker

OTHER = "other"
MAX_NAME_CHARS = 128


class Capped:
    """First ``limit`` distinct names kept as they are; later newcomers become ``other``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, name: str) -> str:
        if name in self._seen:
            return name
        if len(self._seen) < self._limit:
            self._seen.add(name)
            return name
        return OTHER

    def __len__(self) -> int:
        return len(self._seen)


@dataclass(slots=True)
class InsightTicket:
    """What `begin` decided for one request, carried to `finish` and `analyse`."""

    route: str
    tenant: str
    """The tenant group (capped)."""
    sample: bool
    scope_tenant: str = ""
    """The real tenant, only to root a chain computed here (never reported)."""
    model: str = ""
    endpoint: str = ""
    body: dict[str, Any] | None = None
    chain: tuple[int, ...] | None = None

    def attach(
        self, endpoint: str, model: str, body: dict[str, Any], chain: tuple[int, ...]
    ) -> None:
        """Keep what `analyse` needs (references only: nothing is copied on the hot path)."""
        self.endpoint = endpoint
        self.model = model
        self.body = body
        self.chain = chain


@dataclass(frozen=True, slots=True)
class Outcome:
    """What `finish` counted, for the handler's metrics."""

    warmup: bool
    prefill_seconds_saved: float | None
    cost_saved: float | None


_NOTHING = Outcome(False, None, None)
_WARMUP = Outcome(True, None, None)


class InsightsRecorder:
    def __init__(
        self,
        settings: InsightsSettings,
        *,
        route_header: str,
        block_chars: int,
        routing_chain_matches: bool,
        key: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``routing_chain_matches``: the routing chain is the approximate one with
        ``block_chars`` blocks, so `analyse` can reuse it. ``key`` keys the fingerprints
        (default: random per process)."""
        self.settings = settings
        self.route_header = (settings.route_header or route_header).lower()
        self.block_chars = block_chars
        self._reuse_chain = routing_chain_matches
        self._hasher = ApproxHasher(block_chars)
        self._clock = clock
        self._started = clock()
        self.routes = Capped(settings.max_routes)
        self.tenants = Capped(settings.max_tenants)
        self._sampling: dict[tuple[str, str], list[float]] = {}
        self.pricing = Pricing(
            input_price_per_mtok=settings.input_price_per_mtok,
            cached_read_multiplier=settings.cached_read_multiplier,
            cache_write_multiplier=settings.cache_write_multiplier,
            currency=settings.currency,
            prefill_tokens_per_s=settings.prefill_tokens_per_s,
        )
        self.advisor = ShapeAdvisor(
            block_chars=block_chars,
            slots=settings.fingerprint_slots,
            min_savings_tokens=settings.min_savings_tokens,
            min_samples=settings.min_samples,
            key=int.from_bytes(os.urandom(8), "little") if key is None else key,
        )
        self.versions = VersionTracker(
            max_versions=settings.max_versions,
            recovery=settings.warmup_recovery,
            max_requests=settings.warmup_max_requests,
        )
        self.savings = SavingsBook()
        self._seconds_per_cached = (
            1.0 / settings.prefill_tokens_per_s if settings.prefill_tokens_per_s else None
        )
        self._saved_per_cached = (
            settings.input_price_per_mtok * (1.0 - settings.cached_read_multiplier) / 1_000_000
            if settings.input_price_per_mtok is not None
            else None
        )

    def route_of(self, endpoint: str, model: str, headers: Mapping[str, str]) -> str:
        """The route name of a request (`InsightsSettings.route_by`), capped."""
        parts: list[str] = []
        for part in self.settings.route_by:
            if part == "path":
                parts.append(endpoint)
            elif part == "model":
                if model:
                    parts.append(model)
            else:
                value = headers.get(self.route_header)
                if value:
                    parts.append(value)
        name = "/".join(parts)[:MAX_NAME_CHARS] or endpoint
        return self.routes(name)

    def begin(
        self, endpoint: str, model: str, headers: Mapping[str, str], tenant: str
    ) -> InsightTicket:
        route = self.route_of(endpoint, model, headers)
        group = self.tenants(tenant[:MAX_NAME_CHARS])
        state = self._sampling.get((route, group))
        if state is None:
            state = self._sampling[(route, group)] = [0.0, 0.0]
        state[0] += 1
        sample = state[0] <= self.settings.min_samples
        if not sample:
            state[1] += self.settings.sample_rate
            if state[1] >= 1.0:
                state[1] -= 1.0
                sample = True
        return InsightTicket(route, group, sample, tenant)

    def finish(
        self, ticket: InsightTicket, prompt: int, cached: int | None, ttft: float | None,
        version: str,
    ) -> Outcome:  # fmt: skip
        """Count one answered request (usage from the worker, TTFT when streamed)."""
        self.savings.observe(ticket.route, ticket.tenant, prompt, cached, ttft)
        hit = cached or 0
        warmup = self.versions.observe(
            ticket.route, ticket.tenant, version[:MAX_NAME_CHARS], prompt, hit,
            self._clock() - self._started,
        )  # fmt: skip
        if not hit or (self._seconds_per_cached is None and self._saved_per_cached is None):
            return _WARMUP if warmup else _NOTHING
        seconds = hit * self._seconds_per_cached if self._seconds_per_cached else None
        cost = hit * self._saved_per_cached if self._saved_per_cached else None
        return Outcome(warmup, seconds, cost)

    def analyse(self, ticket: InsightTicket, prompt_tokens: int | None) -> ShapeSample | None:
        """The shape analysis of a sampled request (call it off the response path)."""
        body = ticket.body
        if body is None:
            return None
        if ticket.endpoint == "chat":
            text: str | list[int] = render_chat(body.get("messages") or (), body.get("tools"))
        else:
            text = render_completion(body.get("prompt"))
        if not isinstance(text, str) or not text:
            return None  # token-id prompts have no text to fingerprint
        chain = ticket.chain
        if chain is None or not self._reuse_chain:
            chain = self._hasher.chain(scope_key(ticket.scope_tenant, ticket.model), text)
        ticket.body = None
        return self.advisor.observe(ticket.route, ticket.tenant, text, chain, prompt_tokens)

    def route_flags(self) -> dict[str, tuple[bool, float]]:
        """Per route: whether any tenant's shape is flagged, and the largest saving per
        request a reordering would bring (for the Prometheus gauges)."""
        flags: dict[str, tuple[bool, float]] = {}
        for entry in self.advisor.report():
            flagged, savings = flags.get(entry["route"], (False, 0.0))
            flags[entry["route"]] = (
                flagged or entry["flagged"],
                max(savings, entry["savings_tokens_per_request"] if entry["flagged"] else 0.0),
            )
        return flags

    def snapshot(self) -> dict[str, Any]:
        shapes = self.advisor.report()
        settings = self.settings
        return {
            "enabled": True,
            "uptime_s": round(self._clock() - self._started, 3),
            "settings": {
                "sample_rate": settings.sample_rate,
                "min_samples": settings.min_samples,
                "min_savings_tokens": settings.min_savings_tokens,
                "route_by": list(settings.route_by),
                "route_header": self.route_header,
                "block_chars": self.block_chars,
                "warmup_recovery": settings.warmup_recovery,
            },
            "shape": {
                "flagged_routes": sorted({e["route"] for e in shapes if e["flagged"]}),
                "routes": shapes,
            },
            "versions": self.versions.report(),
            "savings": self.savings.report(self.pricing),
            "bounds": {
                "routes": len(self.routes),
                "tenants": len(self.tenants),
                "version_entries": self.versions.tracked()[1],
                "fingerprint_bytes": self.advisor.nbytes,
            },
        }


def disabled_snapshot() -> dict[str, Any]:
    """What ``GET /admin/insights`` answers with ``insights.enabled: false``."""
    return {"enabled": False}
