# least_loaded: each request goes to the healthy worker with the fewest requests in flight.
# Ties go to ring order from the request's affinity key (so equal-load choices still keep a
# prefix together), or to the smallest id without a key. No parameters; ignores warm state.
# Reason: always `fallback`.
"""Least in-flight requests (a baseline for the load tests)."""

from __future__ import annotations

from router.core.model import ClusterView, Decision, PolicyName, RouteRequest
from router.core.policies._common import least_loaded, load_only_decision


class LeastLoaded:
    """Minimum load, ties by ring order from the affinity key, else by id."""

    name: PolicyName = "least_loaded"

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        chosen = least_loaded(view.workers, request.affinity_key, view.ring)
        return load_only_decision(request, view, chosen)
