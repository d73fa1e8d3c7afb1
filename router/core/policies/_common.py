"""Helpers shared by the policies: tie-breaking and the explanatory fields of a Decision."""

from __future__ import annotations

from collections.abc import Sequence

from router.core.model import BlockHash, ClusterView, Decision, RouteRequest, WorkerView
from router.core.ring import HashRing


def best_depth(workers: Sequence[WorkerView], total_blocks: int) -> int:
    """Longest warm match over ``workers``, clamped to the request's own length."""
    best = 0
    for worker in workers:
        if worker.warm_depth > best:
            best = worker.warm_depth
    return min(best, total_blocks)


def least_loaded(
    candidates: Sequence[WorkerView], key: BlockHash | None, ring: HashRing
) -> WorkerView:
    """Minimum load; ties go to ring order from ``key`` (so they stay affine), else to id."""
    lowest = min(worker.load for worker in candidates)
    tied = [worker for worker in candidates if worker.load == lowest]
    if len(tied) == 1:
        return tied[0]
    if key is not None:
        first = ring.first_in(key, {worker.id for worker in tied})
        if first is not None:
            return next(worker for worker in tied if worker.id == first)
    return min(tied, key=lambda worker: worker.id)


def load_only_decision(request: RouteRequest, view: ClusterView, chosen: WorkerView) -> Decision:
    """The `Decision` of a policy that ignores warm state (reason ``fallback``, no cap), with
    the fields that still explain it: warm blocks on the choice, the best anywhere, the owner."""
    total_blocks = len(request.chain)
    key = request.affinity_key
    return Decision(
        worker=chosen.id,
        reason="fallback",
        matched_blocks=min(chosen.warm_depth, total_blocks),
        best_available_blocks=best_depth(view.workers, total_blocks),
        affinity_worker=(None if key is None else view.ring.first_in(key, view.ids)),
        cap=None,
        total_blocks=total_blocks,
    )
