# cache_aware (the default): send a request where its prefix is already warm, within a
# per-worker bounded-load cap, else where its prefix head hashes to on the ring.
#
#   cap  = max(load_floor, ceil(load_factor * (total_in_flight + 1) / healthy_workers)); a
#          worker can take a request only if load + 1 <= cap.
#   best = the longest warm match (WorkerView.warm_depth) over the healthy workers.
#   A match of depth d is usable if d >= min_match_blocks and d / total_blocks >=
#   min_match_ratio.
#   1. If best is usable: among the workers under the cap, take the deepest match (ties:
#      lower load, then ring order from the affinity key, then id). If its depth is `best`
#      -> `warm`; if it is shallower but still usable (every best-depth worker is at the
#      cap) -> `spill`.
#   2. Otherwise walk the ring from the affinity key and take the least loaded of the first
#      `affinity_choices` healthy workers under the cap -> `affinity`, or `spill` if the ring
#      owner was at the cap. A usable warm match
#      that was passed over because every worker holding it was at the cap also makes it a
#      `spill`: the hot prefix overflows to its next ring neighbour, which warms up in turn.
#   3. No affinity key (prompt shorter than a block, no prompt_cache_key): least loaded,
#      `fallback`.
# There is no global "imbalance" switch that turns affinity off for every tenant at once:
# the cap is per worker, so one hot prefix spilling changes nothing for anyone else.
# Parameters (view.tuning, live-tunable): load_factor, load_floor, min_match_blocks,
# min_match_ratio, affinity_choices, and affinity_blocks through the affinity key.
"""Cache-aware routing with bounded loads (DESIGN.md 3.4)."""

from __future__ import annotations

from router.core.bounded import BoundedLoad, load_cap
from router.core.model import ClusterView, Decision, PolicyName, Reason, RouteRequest, WorkerView
from router.core.policies._common import least_loaded


class CacheAware:
    """Deepest warm match under the cap, else bounded ring walk, else least loaded."""

    name: PolicyName = "cache_aware"

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        # One pass for the totals, a second only over workers that could be usable: this
        # runs per request over every healthy worker (hundreds in the offline tuner).
        tuning = view.tuning
        workers = view.workers
        ring = view.ring
        key = request.affinity_key
        total_blocks = len(request.chain)

        total_load = 0
        best = 0
        for worker in workers:
            total_load += worker.load
            if worker.warm_depth > best:
                best = worker.warm_depth
        if best > total_blocks:
            best = total_blocks
        cap = load_cap(tuning.load_factor, total_load, len(workers), tuning.load_floor)
        healthy = view.ids
        affinity_worker = None if key is None else ring.first_in(key, healthy)
        min_blocks = tuning.min_match_blocks
        min_ratio = tuning.min_match_ratio
        warm_usable = best >= min_blocks and best / total_blocks >= min_ratio

        if warm_usable:
            deepest = -1
            deepest_under_cap: list[WorkerView] = []
            for worker in workers:
                depth = worker.warm_depth
                if depth < min_blocks or worker.load >= cap:  # unusable, or load + 1 > cap
                    continue
                if depth > total_blocks:
                    depth = total_blocks
                if depth > deepest:
                    deepest = depth
                    deepest_under_cap = [worker]
                elif depth == deepest:
                    deepest_under_cap.append(worker)
            if deepest >= min_blocks and deepest / total_blocks >= min_ratio:
                chosen = least_loaded(deepest_under_cap, key, ring)
                return Decision(
                    worker=chosen.id,
                    reason="warm" if deepest == best else "spill",
                    matched_blocks=deepest,
                    best_available_blocks=best,
                    affinity_worker=affinity_worker,
                    cap=cap,
                    total_blocks=total_blocks,
                )

        reason: Reason
        if key is not None:
            by_id = {worker.id: worker for worker in workers}
            loads = {worker_id: worker.load for worker_id, worker in by_id.items()}
            choice = BoundedLoad(ring).choose(
                key, loads, tuning.load_factor, tuning.load_floor, tuning.affinity_choices
            )
            chosen = by_id[choice.worker]
            reason = "spill" if choice.spilled or warm_usable else "affinity"
        else:
            chosen = least_loaded(workers, None, ring)
            reason = "spill" if warm_usable else "fallback"
        return Decision(
            worker=chosen.id,
            reason=reason,
            matched_blocks=min(chosen.warm_depth, total_blocks),
            best_available_blocks=best,
            affinity_worker=affinity_worker,
            cap=cap,
            total_blocks=total_blocks,
        )
