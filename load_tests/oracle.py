"""Cache bounds for a trace, computed with the simulator's own tokenizer, hashes and cache.

Two questions a load-test report must answer besides "what did the router reach":

- **Oracle bound**: what could a perfect router reach on this trace and this cluster? We
  replay the trace in order through ONE cache as large as the whole cluster's
  (``workers x cache_blocks`` blocks), with vLLM's hit rules (full blocks only, at least one
  prompt token computed) and the offline-optimal eviction (Belady: drop the block whose
  next use is farthest away; deeper blocks first on ties, so the cache stays prefix-closed
  and every block hit is a prefix hit). Any router's per-worker caches hold, at every
  moment, a set of blocks that such a pooled cache could also hold, and LRU cannot beat
  the optimal policy, so no router can exceed this bound on the same sequence. The
  *unbounded* figure (an infinite cache) counts every block seen before in the same scope.
- **Hit available vs captured**, per run: the run's own assignments (which worker served
  what, in the order the requests started) are replayed through one cache per worker; for
  each request, *available* is the longest prefix warm on any worker, *captured* the prefix
  warm on the worker it went to. Their gap is what routing left on the table; this works
  for every target, peers included, since it needs only the worker each response names.

Tenant scope: a request's cache salt is the body's ``cache_salt`` when the client set one,
else its tenant id, so tenants never share blocks here (our router salts per tenant; in
scenarios where tenants share text the clients salt their own requests, so a peer router's
workers isolate them too). Time is not modelled: requests finish before the next starts,
which only makes the bounds more generous.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from load_tests.records import RequestRecord
from load_tests.workload import CHAT_PATH, TraceRequest
from worker.sim.cache import PrefixCache
from worker.sim.config import DEFAULT_HASH_SEED, MAX_DEFAULT_MODEL_LEN
from worker.sim.hashing import BlockHasher
from worker.sim.protocol import parse_request


@dataclass(frozen=True, slots=True)
class CacheGeometry:
    """The cluster's KV cache as the simulated workers have it."""

    workers: int
    cache_blocks: int
    """Blocks per worker."""
    block_size: int = 16
    model: str = "sim-model"

    @property
    def cluster_blocks(self) -> int:
        return self.workers * self.cache_blocks


@dataclass(frozen=True, slots=True)
class Prompt:
    """One request as the worker sees it: its tokens, full-block hashes, scope and output."""

    tokens: list[int]
    hashes: list[bytes]
    salt: str
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Bound:
    """Cached tokens a perfect router could reach on a trace."""

    requests: int
    prompt_tokens: int
    pooled_cached_tokens: int
    """With one optimally evicted cache as large as the cluster's (the oracle bound)."""
    unbounded_cached_tokens: int
    """With an infinite cache (nothing is ever evicted)."""

    @property
    def pooled_ratio(self) -> float | None:
        return self.pooled_cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    @property
    def unbounded_ratio(self) -> float | None:
        return self.unbounded_cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "pooled_cached_tokens": self.pooled_cached_tokens,
            "unbounded_cached_tokens": self.unbounded_cached_tokens,
            "cached_token_ratio": _round(self.pooled_ratio),
            "unbounded_cached_token_ratio": _round(self.unbounded_ratio),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


class PromptBuilder:
    """Turns trace requests into what the simulated worker would compute for them."""

    def __init__(self, geometry: CacheGeometry) -> None:
        self.geometry = geometry
        self.hasher = BlockHasher(geometry.block_size, DEFAULT_HASH_SEED)

    def prompt(self, request: TraceRequest) -> Prompt:
        kind = "chat" if request.path == CHAT_PATH else "completions"
        parsed = parse_request(
            kind,
            request.body,
            served_model=self.geometry.model,
            max_model_len=MAX_DEFAULT_MODEL_LEN,
        )
        salt = parsed.cache_salt or request.tenant
        tokens = parsed.prompt_ids
        return Prompt(tokens, self.hasher.chain(tokens, salt), salt, parsed.max_tokens)


def _serve(cache: PrefixCache, prompt: Prompt) -> int:
    """Admit and immediately release ``prompt`` on ``cache``; the tokens it found cached."""
    allocation = cache.admit(prompt.tokens, prompt.hashes, prompt.salt, 1)
    if allocation is None:  # larger than the whole cache: nothing is kept, nothing hit
        return 0
    cache.release(allocation)
    return allocation.hit_tokens


def _unbounded_hit(seen: set[bytes], prompt: Prompt, block_size: int) -> int:
    usable = max(0, (len(prompt.tokens) - 1) // block_size)
    hit = 0
    for block_hash in prompt.hashes[:usable]:
        if block_hash not in seen:
            break
        hit += 1
    seen.update(prompt.hashes)
    return hit * block_size


def _optimal_hits(prompts: Sequence[Prompt], capacity: int, block_size: int) -> int:
    """Cached tokens over ``prompts`` with a ``capacity``-block cache under Belady eviction."""
    never = len(prompts)
    # next_use[i][j]: the next request after i whose chain holds block j of request i.
    next_use: list[list[int]] = [[] for _ in prompts]
    upcoming: dict[bytes, int] = {}
    for i in range(len(prompts) - 1, -1, -1):
        hashes = prompts[i].hashes
        next_use[i] = [upcoming.get(h, never) for h in hashes]
        for h in hashes:
            upcoming[h] = i
    cache: dict[bytes, int] = {}  # block hash -> its next use (the heap may hold stale ones)
    heap: list[tuple[int, int, bytes]] = []
    cached = 0
    for i, prompt in enumerate(prompts):
        usable = max(0, (len(prompt.tokens) - 1) // block_size)
        hit = 0
        for h in prompt.hashes[:usable]:
            if h not in cache:
                break
            hit += 1
        cached += hit * block_size
        for j, (h, use) in enumerate(zip(prompt.hashes, next_use[i], strict=True)):
            cache[h] = use
            heapq.heappush(heap, (-use, -j, h))
        while len(cache) > capacity:
            neg_use, _, h = heapq.heappop(heap)
            if cache.get(h) == -neg_use:
                del cache[h]
    return cached


def oracle_bound(
    requests: Iterable[TraceRequest], geometry: CacheGeometry, builder: PromptBuilder | None = None
) -> Bound:
    """The pooled (optimal) and unbounded cached-token ceilings of ``requests`` in order."""
    builder = builder or PromptBuilder(geometry)
    prompts = [builder.prompt(r) for r in requests]
    seen: set[bytes] = set()
    unbounded = sum(_unbounded_hit(seen, p, geometry.block_size) for p in prompts)
    pooled = _optimal_hits(prompts, geometry.cluster_blocks, geometry.block_size)
    return Bound(len(prompts), sum(len(p.tokens) for p in prompts), pooled, unbounded)


@dataclass(frozen=True, slots=True)
class HitShares:
    """Prompt tokens that were warm somewhere (available) and where the request went
    (captured), from a replay of one run's own assignments."""

    requests: int
    prompt_tokens: int
    available_tokens: int
    captured_tokens: int

    def to_json(self) -> dict[str, Any]:
        total = self.prompt_tokens
        return {
            "requests": self.requests,
            "prompt_tokens": total,
            "available_tokens": self.available_tokens,
            "captured_tokens": self.captured_tokens,
            "available_ratio": _round(self.available_tokens / total) if total else None,
            "captured_ratio": _round(self.captured_tokens / total) if total else None,
            "captured_over_available": (
                _round(self.captured_tokens / self.available_tokens)
                if self.available_tokens
                else None
            ),
        }


def hit_shares(
    requests: Sequence[TraceRequest],
    records: Sequence[RequestRecord],
    geometry: CacheGeometry,
    builder: PromptBuilder | None = None,
) -> HitShares:
    """Replay a run's assignments through one cache per worker (see the module docstring).

    Requests without a worker (errors, not sent) are skipped; they reached no cache.
    """
    builder = builder or PromptBuilder(geometry)
    by_index = {r.index: r for r in requests}
    caches: dict[str, PrefixCache] = {}
    served = sorted((r for r in records if r.ok and r.worker), key=lambda r: r.started)
    count = prompt_tokens = available = captured = 0
    for record in served:
        request = by_index.get(record.index)
        if request is None or record.worker is None:
            continue
        prompt = builder.prompt(request)
        if record.worker not in caches:
            caches[record.worker] = PrefixCache(geometry.cache_blocks, builder.hasher)
        usable = len(prompt.tokens)
        best = max(len(c.longest_hit(prompt.hashes, usable)) for c in caches.values())
        count += 1
        prompt_tokens += usable
        available += best * geometry.block_size
        captured += _serve(caches[record.worker], prompt)
    return HitShares(count, prompt_tokens, available, captured)
