# round_robin: each request goes to the healthy worker whose id follows the previous choice in
# sorted-id order, wrapping to the smallest id. No parameters; ignores load and warm state.
# Rotating by "next id after the last one" rather than a counter modulo n keeps the rotation
# even when workers join or leave between requests. Reason: always `fallback`.
"""Round robin over the healthy workers (a baseline for the load tests)."""

from __future__ import annotations

from router.core.model import ClusterView, Decision, PolicyName, RouteRequest, WorkerId, WorkerView
from router.core.policies._common import load_only_decision


class RoundRobin:
    """Rotates over healthy workers in id order; its only state is the last id chosen."""

    name: PolicyName = "round_robin"

    def __init__(self) -> None:
        self._last: WorkerId | None = None

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        last = self._last
        smallest: WorkerView | None = None
        following: WorkerView | None = None
        for worker in view.workers:
            if smallest is None or worker.id < smallest.id:
                smallest = worker
            if (
                last is not None
                and worker.id > last
                and (following is None or worker.id < following.id)
            ):
                following = worker
        chosen = following or smallest
        assert chosen is not None, "view.workers is never empty"
        self._last = chosen.id
        return load_only_decision(request, view, chosen)
