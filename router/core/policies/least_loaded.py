# least_loaded: each request goes to the healthy worker with the fewest requests in flight.
# Ties go to ring order from the request's affinity key (so equal-load choices still keep a
# prefix together), or to the smallest id without a key. No parameters; ignores warm state.
# Reason: always `fallback`.
"""Least in-flight requests (a baseline for the load tests)."""

from __future__ import annotations

from router.core.model import ClusterView, Decision, PolicyName, RouteRequest
from router.core.policies._common import best_depth, least_loaded


class LeastLoaded:
    """Minimum load, ties by ring order from the affinity key, else by id."""

    name: PolicyName = "least_loaded"

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        key = request.affinity_key
        chosen = least_loaded(view.workers, key, view.ring)
        total_blocks = len(request.chain)
        return Decision(
            worker=chosen.id,
            reason="fallback",
            matched_blocks=min(chosen.warm_depth, total_blocks),
            best_available_blocks=best_depth(view.workers, total_blocks),
            affinity_worker=(
                None if key is None else view.ring.first_in(key, {w.id for w in view.workers})
            ),
            cap=None,
            total_blocks=total_blocks,
        )
