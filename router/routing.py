"""From a parsed request to a chosen worker: render, hash, look up, choose, learn.

`Router` glues the pure core (hasher, policy, ring) to the edges it needs for a decision: the
warm index and the pool's health and loads. It performs no HTTP. The proxy calls `plan` once
per request, `decide` once per attempt (excluding workers that already failed this request),
and `learn` when a worker's usage report comes back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass

from router.config import Settings, TuningState
from router.core.blocks import ApproxHasher, affinity_key, cache_key_affinity, scope_key
from router.core.model import (
    ClusterView,
    Decision,
    Hasher,
    Policy,
    RouteRequest,
    WorkerId,
    WorkerView,
)
from router.core.policies import make_policy
from router.core.render import render_chat, render_completion
from router.errors import NoHealthyWorker
from router.index import Source, WarmIndex
from router.parse import ParsedRequest
from router.telemetry import Metrics
from router.workers import Worker, WorkerPool

log = logging.getLogger("prefix_router.routing")


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int | None
    """None when the worker did not report prompt_tokens_details."""
    completion_tokens: int = 0


class Router:
    def __init__(
        self,
        settings: Settings,
        tuning: TuningState,
        pool: WorkerPool,
        index: WarmIndex,
        metrics: Metrics,
        *,
        policy: Policy | None = None,
        hasher: Hasher | None = None,
    ) -> None:
        self.settings = settings
        self.tuning = tuning
        self.pool = pool
        self.index = index
        self.metrics = metrics
        self.policy = policy or make_policy(settings.routing.policy)
        self.hasher = hasher or ApproxHasher(settings.routing.block_chars)

    def plan(self, parsed: ParsedRequest, tenant: str) -> RouteRequest:
        """Render and hash the prompt into a tenant-scoped chain with its affinity key."""
        body = parsed.body
        prompt = (
            render_chat(body["messages"], body.get("tools"))
            if parsed.endpoint == "chat"
            else render_completion(body["prompt"])
        )
        scope = scope_key(tenant, parsed.model)
        chain = self.hasher.chain(scope, prompt)
        if parsed.prompt_cache_key is not None:
            key: int | None = cache_key_affinity(scope, parsed.prompt_cache_key)
        else:
            key = affinity_key(chain, self.tuning.current.affinity_blocks)
        return RouteRequest(chain, key, tenant, self.hasher.units(prompt))

    async def view(
        self, request: RouteRequest, exclude: Collection[str] = ()
    ) -> tuple[ClusterView, dict[str, Worker]]:
        """The cluster as a policy sees it for this request; fails open on index errors."""
        routable = [w for w in self.pool.routable() if w.id not in exclude]
        if not routable:
            raise NoHealthyWorker(
                "no healthy worker available"
                + (" (all candidates failed for this request)" if exclude else "")
            )
        depths: dict[WorkerId, int] = {}
        if request.chain:
            started = time.perf_counter()
            try:
                depths = await self.index.lookup(request.chain)
            except Exception:
                self.metrics.index_errors.labels("lookup").inc()
                log.warning("warm-index lookup failed; routing by ring only", exc_info=True)
            self.metrics.index_lookup_seconds.observe(time.perf_counter() - started)
        view = ClusterView(
            workers=tuple(WorkerView(w.id, w.inflight, depths.get(w.id, 0)) for w in routable),
            ring=self.pool.ring,
            tuning=self.tuning.current,
        )
        return view, {w.id: w for w in routable}

    async def decide(
        self, request: RouteRequest, exclude: Collection[str] = ()
    ) -> tuple[Decision, Worker]:
        view, workers = await self.view(request, exclude)
        decision = self.policy.choose(request, view)
        worker = workers[decision.worker]
        self.metrics.decisions.labels(self.policy.name, decision.reason).inc()
        if request.chain:
            await self._safe_record(worker, request, "predicted")
        return decision, worker

    async def learn(
        self, worker: Worker, request: RouteRequest, decision: Decision, usage: Usage | None
    ) -> None:
        """A worker answered: it now holds the whole chain (vLLM caches every full block it
        computed), so confirm it; count predictions the worker's usage contradicts."""
        if not request.chain:
            return
        await self._safe_record(worker, request, "confirmed")
        if usage is None or usage.cached_tokens is None or usage.prompt_tokens <= 0:
            return
        observed = usage.cached_tokens * len(request.chain) // usage.prompt_tokens
        if decision.matched_blocks > observed + 1:
            self.metrics.index_mispredicted.inc()

    async def forget_prediction(
        self, worker: Worker, request: RouteRequest, decision: Decision
    ) -> None:
        """The attempt failed before the worker computed anything: drop what we predicted."""
        if len(request.chain) > decision.matched_blocks:
            try:
                await self.index.remove(worker.id, request.chain[decision.matched_blocks :])
            except Exception:
                self.metrics.index_errors.labels("remove").inc()

    async def _safe_record(self, worker: Worker, request: RouteRequest, source: Source) -> None:
        try:
            await self.index.record(worker.id, request.chain, source)
        except Exception:
            self.metrics.index_errors.labels("record").inc()
            log.warning("warm-index record failed", exc_info=True)
