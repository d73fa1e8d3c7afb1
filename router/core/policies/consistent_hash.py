# consistent_hash: consistent hashing with bounded loads. Walk the ring clockwise from the
# request's affinity key (chain head at `affinity_blocks`, or the hashed prompt_cache_key) and
# take the first healthy worker with load + 1 <= cap, cap = ceil(load_factor * (total + 1) / n)
# over the healthy workers. Reason `affinity` when the ring owner (first healthy worker on the
# walk) takes it, `spill` when it was at its cap. Without a key: least loaded, `fallback`.
# Parameters (view.tuning): load_factor, and affinity_blocks through the key.
"""Bounded-load consistent hashing: affinity by prompt head, ignoring warm state."""

from __future__ import annotations

from router.core.bounded import BoundedLoad, load_cap
from router.core.model import ClusterView, Decision, PolicyName, RouteRequest
from router.core.policies._common import best_depth, least_loaded


class ConsistentHash:
    """Bounded-load ring walk from the affinity key."""

    name: PolicyName = "consistent_hash"

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        workers = view.workers
        key = request.affinity_key
        total_blocks = len(request.chain)
        best = best_depth(workers, total_blocks)
        if key is None:
            chosen = least_loaded(workers, None, view.ring)
            return Decision(
                worker=chosen.id,
                reason="fallback",
                matched_blocks=min(chosen.warm_depth, total_blocks),
                best_available_blocks=best,
                affinity_worker=None,
                cap=load_cap(
                    view.tuning.load_factor, view.total_load, len(workers), view.tuning.load_floor
                ),
                total_blocks=total_blocks,
            )
        loads = {worker.id: worker.load for worker in workers}
        tuning = view.tuning
        choice = BoundedLoad(view.ring).choose(key, loads, tuning.load_factor, tuning.load_floor)
        depth = next(worker.warm_depth for worker in workers if worker.id == choice.worker)
        return Decision(
            worker=choice.worker,
            reason="spill" if choice.spilled else "affinity",
            matched_blocks=min(depth, total_blocks),
            best_available_blocks=best,
            affinity_worker=choice.owner,
            cap=choice.cap,
            total_blocks=total_blocks,
        )
