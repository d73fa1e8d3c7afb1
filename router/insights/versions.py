"""Prefix versions: hit rate and cached tokens per version, and rollout warmup attribution.

A request may name the version of its prompt prefix (``x-prefix-version``). When a route
rolls out a new version, the workers' caches do not hold its head yet: its first requests
miss, and the route's cached-token ratio dips until the new head is warm. That dip is the
price of the rollout, not a fault, and an alert on the hit rate should not fire for it.

Per route and tenant (tenants never share a cache), the tracker keeps a *reference*: the
moving average of the cached-token ratio (cached / prompt tokens) of the route's requests
outside any warmup. A version first seen while a reference exists is a rollout: it starts
*warming*, and its requests count as warmup until one of them reaches ``recovery`` times the
reference (the version is then *warm*). A version that has not recovered after
``max_requests`` warmup requests is *stalled*: its misses count as real ones from then on,
so a new version that truly breaks caching (say, a timestamp moved to the front) still
raises the alarm. The first version a route shows has nothing to recover to (*baseline*).

Bounded: at most ``max_versions`` versions per route and tenant, the least recently seen
dropped first (its figures leave the breakdown; the route's totals in the savings report
keep them). Routes and tenants are capped by the caller.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

VersionState = Literal["baseline", "warming", "warm", "stalled"]
REFERENCE_ALPHA = 0.2
"""Weight of the newest request in the reference ratio (about the last 10 requests)."""
REFERENCE_MIN_REQUESTS = 3
"""Requests outside warmup a route needs before a new version counts as a rollout."""
UNVERSIONED = "unversioned"
_STATE_ORDER: dict[VersionState, int] = {"warming": 0, "stalled": 1, "warm": 2, "baseline": 3}


@dataclass(slots=True)
class VersionStats:
    version: str
    state: VersionState
    first_seen: float
    last_seen: float
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    warmup_requests: int = 0
    warmup_prompt_tokens: int = 0
    warmup_cached_tokens: int = 0

    def merge(self, other: VersionStats) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.cached_tokens += other.cached_tokens
        self.warmup_requests += other.warmup_requests
        self.warmup_prompt_tokens += other.warmup_prompt_tokens
        self.warmup_cached_tokens += other.warmup_cached_tokens
        self.first_seen = min(self.first_seen, other.first_seen)
        self.last_seen = max(self.last_seen, other.last_seen)
        if _STATE_ORDER[other.state] < _STATE_ORDER[self.state]:
            self.state = other.state


@dataclass(slots=True)
class _Lane:
    """One route and tenant."""

    reference: float | None = None
    steady_requests: int = 0
    versions: OrderedDict[str, VersionStats] = field(default_factory=OrderedDict)


class VersionTracker:
    def __init__(self, *, max_versions: int, recovery: float, max_requests: int) -> None:
        self.max_versions = max_versions
        self.recovery = recovery
        self.max_requests = max_requests
        self._lanes: dict[tuple[str, str], _Lane] = {}

    def observe(
        self, route: str, tenant: str, version: str, prompt: int, cached: int, now: float
    ) -> bool:
        """Count one answered request; True when it is warmup of a new version."""
        lane = self._lanes.get((route, tenant))
        if lane is None:
            lane = self._lanes[(route, tenant)] = _Lane()
        version = version or UNVERSIONED
        stats = lane.versions.get(version)
        if stats is None:
            rollout = lane.reference is not None and lane.steady_requests >= REFERENCE_MIN_REQUESTS
            stats = VersionStats(version, "warming" if rollout else "baseline", now, now)
            lane.versions[version] = stats
            if len(lane.versions) > self.max_versions:
                lane.versions.popitem(last=False)
        else:
            lane.versions.move_to_end(version)
            stats.last_seen = now
        ratio = cached / prompt if prompt > 0 else 0.0
        warmup = False
        if stats.state == "warming":
            assert lane.reference is not None
            if ratio >= self.recovery * lane.reference:
                stats.state = "warm"
            elif stats.warmup_requests >= self.max_requests:
                stats.state = "stalled"
            else:
                warmup = True
        stats.requests += 1
        stats.prompt_tokens += prompt
        stats.cached_tokens += cached
        if warmup:
            stats.warmup_requests += 1
            stats.warmup_prompt_tokens += prompt
            stats.warmup_cached_tokens += cached
        else:
            lane.steady_requests += 1
            previous = lane.reference
            lane.reference = (
                ratio if previous is None else previous + REFERENCE_ALPHA * (ratio - previous)
            )
        return warmup

    def tracked(self) -> tuple[int, int]:
        """(route-and-tenant lanes, version entries over all lanes): the memory bound."""
        return len(self._lanes), sum(len(lane.versions) for lane in self._lanes.values())

    def report(self) -> list[dict[str, Any]]:
        """Per route and version (tenants summed), oldest version first within a route."""
        merged: dict[tuple[str, str], VersionStats] = {}
        for (route, _tenant), lane in self._lanes.items():
            for version, stats in lane.versions.items():
                key = (route, version)
                if key not in merged:
                    merged[key] = VersionStats(
                        version, stats.state, stats.first_seen, stats.last_seen
                    )
                merged[key].merge(stats)
        rows = sorted(merged.items(), key=lambda item: (item[0][0], item[1].first_seen))
        return [_row(route, stats) for (route, _), stats in rows]


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole > 0 else None


def _row(route: str, s: VersionStats) -> dict[str, Any]:
    steady_prompt = s.prompt_tokens - s.warmup_prompt_tokens
    steady_cached = s.cached_tokens - s.warmup_cached_tokens
    return {
        "route": route,
        "version": s.version,
        "state": s.state,
        "requests": s.requests,
        "prompt_tokens": s.prompt_tokens,
        "cached_tokens": s.cached_tokens,
        "hit_rate": _ratio(s.cached_tokens, s.prompt_tokens),
        "hit_rate_after_warmup": _ratio(steady_cached, steady_prompt),
        "warmup": {
            "requests": s.warmup_requests,
            "prompt_tokens": s.warmup_prompt_tokens,
            "cached_tokens": s.warmup_cached_tokens,
            "missed_tokens": s.warmup_prompt_tokens - s.warmup_cached_tokens,
        },
    }
