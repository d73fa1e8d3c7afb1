"""From a parsed request to a chosen worker: render, hash, look up, choose, learn.

`Router` glues the pure core (hasher, policy, ring) to the edges it needs for a decision: the
warm index and the pool's health and loads. It performs no HTTP. The proxy calls `plan` once
per request, `decide` once per attempt (excluding workers that already failed this request),
and `learn` when a worker's usage report comes back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

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
from router.errors import IndexUnavailable, NoHealthyWorker
from router.index import Source, WarmIndex
from router.loads import LoadBoard
from router.parse import ParsedRequest
from router.scrape import EngineStats
from router.telemetry import Metrics
from router.workers import Worker, WorkerPool

if TYPE_CHECKING:
    from router.exact import ExactHasher

log = logging.getLogger("prefix_router.routing")


def make_exact(settings: Settings) -> ExactHasher:
    """Load the tokenizer and template for exact mode (fails at start, not per request)."""
    from router.exact import ExactConfig, ExactHasher

    exact = settings.exact
    assert exact.model_dir is not None, "validated by Settings"
    return ExactHasher(
        ExactConfig(
            model_dir=exact.model_dir,
            block_size=exact.block_size,
            hash_algo=exact.hash_algo,
            hash_seed=exact.hash_seed,
            chat_template=exact.chat_template,
            content_format=exact.content_format,
            lora_adapters=dict(exact.lora_adapters),
        )
    )


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
        loads: LoadBoard,
        metrics: Metrics,
        *,
        policy: Policy | None = None,
        hasher: Hasher | None = None,
    ) -> None:
        self.settings = settings
        self.tuning = tuning
        self.pool = pool
        self.index = index
        self.loads = loads
        self.metrics = metrics
        interval = settings.health.scrape_interval_s
        self._engine_max_age = 2.5 * interval if interval > 0 else 0.0
        self.policy = policy or make_policy(settings.routing.policy)
        self.hasher = hasher or ApproxHasher(settings.routing.block_chars)
        self.exact = make_exact(settings) if settings.routing.hasher == "vllm" else None
        # Tokens in one index block: vLLM's block in exact mode; about four characters per
        # token for the approximate hasher.
        self._tokens_per_block = (
            settings.exact.block_size
            if self.exact is not None
            else max(1, settings.routing.block_chars // 4)
        )

    async def plan(self, parsed: ParsedRequest, tenant: str, cache_salt: str) -> RouteRequest:
        """Render and hash the prompt into a tenant-scoped chain with its affinity key.

        Approximate mode hashes the rendered text in the event loop (tens of microseconds).
        Exact mode tokenizes with the model's tokenizer and template (milliseconds), in a
        thread; its chain is scoped by ``cache_salt`` in block 0, as vLLM's is."""
        body = parsed.body
        scope = scope_key(tenant, parsed.model)
        if self.exact is not None:
            exact = await asyncio.to_thread(
                self.exact.request_chain, parsed.endpoint, body, cache_salt=cache_salt
            )
            chain, units = exact.chain, exact.prompt_tokens
        else:
            prompt = (
                render_chat(body["messages"], body.get("tools"))
                if parsed.endpoint == "chat"
                else render_completion(body["prompt"])
            )
            chain, units = self.hasher.chain(scope, prompt), self.hasher.units(prompt)
        if parsed.prompt_cache_key is not None:
            key: int | None = cache_key_affinity(scope, parsed.prompt_cache_key)
        else:
            key = affinity_key(chain, self.tuning.current.affinity_blocks)
        return RouteRequest(chain, key, tenant, units)

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
            except IndexUnavailable:
                self.metrics.index_errors.labels("lookup").inc()
            except Exception:
                self.metrics.index_errors.labels("lookup").inc()
                log.warning("warm-index lookup failed; routing by ring only", exc_info=True)
            self.metrics.index_lookup_seconds.observe(time.perf_counter() - started)
        now = time.monotonic()
        view = ClusterView(
            workers=tuple(
                WorkerView(w.id, self.load_of(w, now), depths.get(w.id, 0)) for w in routable
            ),
            ring=self.pool.ring,
            tuning=self.tuning.current,
        )
        return view, {w.id: w for w in routable}

    def load_of(self, worker: Worker, now: float) -> int:
        """In-flight requests on ``worker`` across every replica, plus what its engine runs
        for clients that bypass the routers (from a fresh enough ``/metrics`` scrape)."""
        load = self.loads.load(worker.id)
        engine = worker.engine
        if engine is not None and now - engine.scraped_at <= self._engine_max_age:
            load += worker.external_load
        return load

    def acquire(self, worker: Worker) -> None:
        self.pool.acquire(worker)
        self.loads.acquire(worker.id)

    def release(self, worker: Worker) -> None:
        self.pool.release(worker)
        self.loads.release(worker.id)

    def engine_report(self, worker: Worker, stats: EngineStats) -> None:
        """A scrape of the worker's ``/metrics`` came in: keep it, and estimate the load that
        no router accounts for (what the engine runs or queues beyond our in-flight count)."""
        worker.engine = stats
        worker.external_load = max(0, stats.running + stats.waiting - self.loads.load(worker.id))
        if stats.num_gpu_blocks and stats.block_size:
            # The index mirrors the worker's cache: remembering more than the worker can hold
            # would keep crediting it with blocks it already evicted.
            tokens = stats.num_gpu_blocks * stats.block_size
            self.index.set_capacity(worker.id, tokens // self._tokens_per_block)

    async def decide(
        self, request: RouteRequest, exclude: Collection[str] = ()
    ) -> tuple[Decision, Worker, int]:
        """Choose a worker; returns the decision, the worker and the load the policy saw."""
        view, workers = await self.view(request, exclude)
        decision = self.policy.choose(request, view)
        worker = workers[decision.worker]
        seen_load = next(w.load for w in view.workers if w.id == decision.worker)
        metrics = self.metrics
        metrics.child(metrics.decisions, self.policy.name, decision.reason).inc()
        if request.chain:
            await self._safe_record(worker, request, "predicted")
        return decision, worker, seen_load

    async def learn(
        self, worker: Worker, request: RouteRequest, decision: Decision, usage: Usage | None
    ) -> None:
        """A worker answered: it now holds the whole chain (vLLM caches every full block it
        computed), so confirm it; count predictions the worker's usage contradicts.

        With KV-event sidecars feeding the index (`index.kv_events`), vLLM's own events say
        what it stored and evicted; a confirmation from here could land after an eviction
        event and credit the worker with blocks it no longer holds, so none is written."""
        if not request.chain:
            return
        if not self.settings.index.kv_events:
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
        if worker.removed:
            # A request that outlived its worker's membership (discovery, admin): its index
            # entries were cleared on removal and must not come back.
            return
        try:
            await self.index.record(worker.id, request.chain, source)
        except IndexUnavailable:
            # The index logs its own down/up transitions; a traceback per request adds nothing.
            self.metrics.index_errors.labels("record").inc()
        except Exception:
            self.metrics.index_errors.labels("record").inc()
            log.warning("warm-index record failed", exc_info=True)
