"""Offline replay: a trace through the live router's policy code over a simulated cluster.

No network and no clock: requests arrive at their trace offsets in simulated time, and every
routing decision is made by the real policy objects (`router.core.policies.make_policy`) on
a `ClusterView` built the way `router.routing.Router.view` builds it, over a `HashRing` of
workers ``w0..w{N-1}`` with the live ring's virtual nodes. Around the policy, two models:

- **What the router knows** (the embedded warm index, `router.index.memory`): on each
  decision the request's chain is recorded as *predicted* on the chosen worker (expiring
  after ``predicted_ttl_s``) and, when the response ends, *confirmed* (what `Router.learn`
  does); per worker an LRU of router blocks bounded by the worker's KV size as the router
  learns it from ``/metrics`` (``cache_blocks * block_size // (block_chars // 4)``). Loads
  are the router's own in-flight counts: +1 at the decision, -1 when the response ends.
- **What each worker does** (`prefix-worker sim`, `worker.sim.engine` and `worker.sim.cache`):
  a paged prefix cache of ``cache_blocks`` blocks of ``block_size`` tokens; a hit is the
  longest run of leading full blocks held, capped at ``(prompt_tokens - 1) // block_size``;
  admission needs free blocks for the uncached prompt blocks and the completion's, else the
  FIFO queue waits; a finishing request frees its blocks tail first (decode blocks, then the
  prompt from its deepest block), and new blocks are taken from the least recently freed.
  Time: one prefill lane (``decode_ms`` + ``prefill_us`` per uncached token, booked at
  admission), then one token per ``decode_ms``, delivered on the stream ticks (5 ms
  streaming, 50 ms otherwise) as the simulator paces them; at most ``max_running`` admitted.

Both models work on the segment paths of `load_tests.replay_shapes` (router blocks for the
index, simulator blocks for the caches), so a lookup or an admission costs a few dictionary
operations per segment, not per block. Simplifications, each a small fraction of a block per
request: a completion's decode blocks are taken at admission rather than token by token; a
recomputed duplicate of a cached block (the capped last block) is not kept twice; a request
the simulator would reject for its length is counted as rejected and never routed.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from load_tests.replay_shapes import ROOT, ShapedTrace, paused_gc
from load_tests.report import percentile_of_sorted
from router.core.model import ClusterView, RouteRequest, Tuning, WorkerId, WorkerView
from router.core.policies import make_policy
from router.core.ring import DEFAULT_VNODES, HashRing
from worker.sim.config import MAX_DEFAULT_MODEL_LEN, SimConfig
from worker.sim.server import NON_STREAM_TICK_S

_SIM_DEFAULTS = SimConfig.__dataclass_fields__
_JUNK = -1
"""Queue entries of blocks that no request can hit (decode blocks, partial blocks, copies)."""


def _sim_default(name: str) -> Any:
    return _SIM_DEFAULTS[name].default


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """The simulated cluster: the simulator's settings (its defaults) and the router's."""

    workers: int
    # The simulator's own defaults (SimConfig), read once at import so the two never drift.
    cache_blocks: int = _sim_default("cache_blocks")  # noqa: RUF009
    block_size: int = _sim_default("block_size")  # noqa: RUF009
    prefill_us_per_token: float = _sim_default("prefill_us_per_token")  # noqa: RUF009
    decode_ms_per_token: float = _sim_default("decode_ms_per_token")  # noqa: RUF009
    max_running: int = _sim_default("max_running")  # noqa: RUF009
    stream_interval_ms: float = _sim_default("stream_interval_ms")  # noqa: RUF009
    non_stream_tick_ms: float = 1000.0 * NON_STREAM_TICK_S
    max_model_len: int | None = None
    block_chars: int = 64
    """The router's ``routing.block_chars``."""
    index_capacity_blocks: int = 100_000
    """The router's ``index.capacity_blocks`` (the worker's KV size caps it)."""
    predicted_ttl_s: float = 120.0
    vnodes: int = DEFAULT_VNODES

    def __post_init__(self) -> None:
        if self.workers < 1 or self.cache_blocks < 1 or self.block_size < 1:
            raise ValueError("workers, cache_blocks and block_size must be >= 1")

    @property
    def model_len(self) -> int:
        if self.max_model_len is not None:
            return self.max_model_len
        return min(MAX_DEFAULT_MODEL_LEN, self.cache_blocks * self.block_size)

    @property
    def index_blocks(self) -> int:
        """Router blocks the warm index keeps per worker once it has read the worker's size."""
        tokens_per_block = max(1, self.block_chars // 4)
        learned = self.cache_blocks * self.block_size // tokens_per_block
        return max(1, min(self.index_capacity_blocks, learned))


@dataclass(slots=True)
class ReplayResult:
    """What one configuration did to one trace (figures defined as in `load_tests.report`)."""

    policy: str
    tuning: Tuning
    requests: int
    ok: int
    rejected: int
    prompt_tokens: int
    cached_tokens: int
    ttft_ms: dict[str, float | None]
    load_mean: float
    """Mean in-flight requests per worker over the run."""
    load_max_over_mean: float | None
    """The busiest worker's mean in-flight over the mean (`report`'s load_peak_mean_over_mean)."""
    load_peak: int
    """Most requests in flight on one worker at any moment."""
    decisions: dict[str, int]
    matched_blocks: int
    best_available_blocks: int
    simulated_s: float
    wall_s: float
    cpu_s: float
    """CPU time of this process (the fair measure on a shared machine)."""
    per_worker_requests: list[int] = field(default_factory=list)
    per_request: dict[str, list[Any]] | None = None
    """With ``keep_requests``: worker, cached tokens and TTFT (s) per request."""

    @property
    def cached_token_ratio(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    @property
    def spill_rate(self) -> float:
        return self.decisions.get("spill", 0) / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, Any]:
        ratio = self.cached_token_ratio
        return {
            "policy": self.policy,
            "load_factor": self.tuning.load_factor,
            "min_match_blocks": self.tuning.min_match_blocks,
            "min_match_ratio": self.tuning.min_match_ratio,
            "affinity_blocks": self.tuning.affinity_blocks,
            "requests": self.requests,
            "ok": self.ok,
            "rejected": self.rejected,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "cached_token_ratio": None if ratio is None else round(ratio, 6),
            "ttft_ms": self.ttft_ms,
            "load_mean": round(self.load_mean, 4),
            "load_max_over_mean": (
                None if self.load_max_over_mean is None else round(self.load_max_over_mean, 4)
            ),
            "load_peak": self.load_peak,
            "spill_rate": round(self.spill_rate, 6),
            "decisions": self.decisions,
            "matched_blocks": self.matched_blocks,
            "best_available_blocks": self.best_available_blocks,
            "simulated_s": round(self.simulated_s, 3),
            "wall_s": round(self.wall_s, 3),
            "cpu_s": round(self.cpu_s, 3),
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000.0 * seconds, 3)


def replay(
    shaped: ShapedTrace,
    cluster: ClusterSpec,
    tuning: Tuning | None = None,
    policy: str = "cache_aware",
    *,
    keep_requests: bool = False,
) -> ReplayResult:
    """Replay ``shaped`` through ``policy`` with ``tuning`` over ``cluster``; deterministic."""
    if shaped.block_size != cluster.block_size or shaped.block_chars != cluster.block_chars:
        raise ValueError("the trace was shaped for other block sizes than the cluster's")
    with paused_gc():
        return _replay(shaped, cluster, tuning or Tuning(), policy, keep_requests)


def _replay(
    shaped: ShapedTrace, cluster: ClusterSpec, tuning: Tuning, policy: str, keep_requests: bool
) -> ReplayResult:
    started = time.perf_counter()
    cpu_started = time.process_time()
    n_workers = cluster.workers
    ids = [WorkerId(f"w{i}") for i in range(n_workers)]
    index_of = {worker: i for i, worker in enumerate(ids)}
    ring = HashRing(ids, vnodes=cluster.vnodes)
    choose = make_policy(policy).choose
    id_set = frozenset(ids)
    keys = shaped.affinity_keys(tuning.affinity_blocks)
    # Lists index faster than the tries' arrays (the counts are small ints: no new objects).
    rt_nb = shaped.rt_trie.blocks.tolist()
    rt_parent = shaped.rt_trie.parent
    sim_nb = shaped.sim_trie.blocks.tolist()
    offsets, streams = shaped.offsets, shaped.streams
    prompt_tokens, max_tokens = shaped.prompt_tokens, shaped.max_tokens
    rt_paths, sim_paths = shaped.rt_paths, shaped.sim_paths
    rt_totals = shaped.rt_totals
    tenant_of = shaped.tenants
    tenant_names = shaped.tenant_names
    n_requests = len(offsets)
    heappush, heappop = heapq.heappush, heapq.heappop

    bs = cluster.block_size
    model_len = cluster.model_len
    prefill_s = cluster.prefill_us_per_token / 1e6
    decode_s = cluster.decode_ms_per_token / 1e3
    ticks = (cluster.non_stream_tick_ms / 1e3, cluster.stream_interval_ms / 1e3)
    max_running = cluster.max_running
    ttl = cluster.predicted_ttl_s
    index_cap = cluster.index_blocks
    inf = math.inf

    # The router: loads, views, and the warm index (per worker: LRU of nodes, resident
    # router blocks per node, expiry per node; holders of top-level nodes for lookups).
    load = [0] * n_workers
    area = [0.0] * n_workers
    since = [0.0] * n_workers
    peak = 0
    # Views are immutable and most of them recur, so each (worker, load) and each (worker,
    # load, warm depth) gets one object; `views` holds every worker's current cold view.
    cold: list[list[WorkerView]] = [[WorkerView(w, 0)] for w in ids]
    warm: list[dict[int, WorkerView]] = [{} for _ in ids]
    load_bits = n_requests.bit_length()  # a load never exceeds the requests: key = depth, load
    views = [row[0] for row in cold]
    i_lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in ids]
    i_res: list[dict[int, int]] = [{} for _ in ids]
    i_exp: list[dict[int, float]] = [{} for _ in ids]
    i_size = [0] * n_workers
    holders: dict[int, set[int]] = {}
    chains: dict[int, tuple[int, ...]] = {}

    # The workers: free queue of [node or _JUNK, blocks] runs (a run taken out of the middle
    # keeps its place with 0 blocks until eviction reaches it), node -> its run in the queue,
    # resident blocks and references per node, free blocks; FIFO queue, batch, prefill lane.
    c_queue: list[deque[list[int]]] = [deque([[_JUNK, cluster.cache_blocks]]) for _ in ids]
    c_entry: list[dict[int, list[int]]] = [{} for _ in ids]
    c_res: list[dict[int, int]] = [{} for _ in ids]
    c_ref: list[dict[int, int]] = [{} for _ in ids]
    c_free = [cluster.cache_blocks] * n_workers
    waiting: list[deque[int]] = [deque() for _ in ids]
    running = [0] * n_workers
    lane = [0.0] * n_workers
    finishing: list[tuple[float, int]] = []

    chosen = [-1] * n_requests
    cached = [0] * n_requests
    ttft = [0.0] * n_requests
    reasons: dict[str, int] = {}
    matched_total = best_total = 0

    def record(w: int, path: tuple[int, ...], expiry: float) -> None:
        lru, res, exp = i_lru[w], i_res[w], i_exp[w]
        size = i_size[w]
        for node in reversed(path):
            blocks = rt_nb[node]
            have = res.get(node)
            if have is None:
                res[node] = blocks
                lru[node] = None
                exp[node] = expiry
                size += blocks
                if rt_parent[node] == ROOT:
                    found = holders.get(node)
                    if found is None:
                        holders[node] = {w}
                    else:
                        found.add(w)
            else:
                if have != blocks:
                    size += blocks - have
                    res[node] = blocks
                lru.move_to_end(node)
                if exp[node] < expiry:
                    exp[node] = expiry
        while size > index_cap:
            node = lru.popitem(last=False)[0]
            have = res[node]
            over = size - index_cap
            if have <= over:
                del res[node], exp[node]
                size -= have
                if rt_parent[node] == ROOT:
                    holders[node].discard(w)
            else:  # trimmed, still the least recently used
                res[node] = have - over
                size -= over
                lru[node] = None
                lru.move_to_end(node, last=False)
        i_size[w] = size

    def admit(w: int, j: int) -> int:
        """Blocks hit for request ``j`` on ``w``, or -1 when it cannot be admitted now."""
        path = sim_paths[j]
        res, ref = c_res[w], c_ref[w]
        tokens = prompt_tokens[j]
        hit = evictable = 0
        reached = len(path)
        for k, node in enumerate(path):
            have = res.get(node, 0)
            if have:
                if node not in ref:
                    evictable += have
                hit += have
            if have < sim_nb[node]:
                reached = k
                break
        cap = (tokens - 1) // bs
        if hit > cap:
            hit = cap
        need = -(-(tokens + max_tokens[j] - 1) // bs) - hit
        free = c_free[w]
        if free - evictable < need:
            return -1
        queue, entry = c_queue[w], c_entry[w]
        # The whole prompt becomes resident and referenced. Its runs in the free queue turn
        # into junk first, so the eviction below cannot touch the prompt's own blocks.
        for k, node in enumerate(path):
            run = entry.pop(node, None)
            if run is None:
                ref[node] = ref.get(node, 0) + 1
            else:  # resident, unreferenced
                run[0] = _JUNK
                if k <= reached:  # hit blocks leave the free queue
                    free -= run[1]
                    run[1] = 0
                # else: stale blocks past the first miss stay queued, never hit again
                ref[node] = 1
            res[node] = sim_nb[node]
        c_free[w] = free - need
        # Evict `need` blocks from the head of the free queue (least recently freed first).
        while need:
            run = queue[0]
            node, count = run
            if count <= need:
                queue.popleft()
                if node != _JUNK:
                    del res[node], entry[node]
                need -= count
            else:
                run[1] = count - need
                if node != _JUNK:
                    res[node] -= need
                need = 0
        return hit

    def schedule(w: int, now: float) -> None:
        line = waiting[w]
        while line and running[w] < max_running:
            j = line[0]
            hit = admit(w, j)
            if hit < 0:
                return
            line.popleft()
            running[w] += 1
            hit_tokens = hit * bs
            cached[j] = hit_tokens
            start = lane[w]
            if start < now:
                start = now
            first = start + decode_s + (prompt_tokens[j] - hit_tokens) * prefill_s
            lane[w] = first
            stream = streams[j]
            decode = (max_tokens[j] - 1) * decode_s
            tick = ticks[stream]
            if decode > 0 and tick > 0:
                decode = math.ceil(decode / tick - 1e-9) * tick
            done = first + decode
            ttft[j] = (first if stream else done) - offsets[j]
            heappush(finishing, (done, j))

    def finish(done: float, j: int) -> None:
        w = chosen[j]
        running[w] -= 1
        # The worker frees the request's blocks: decode blocks, then its prompt tail first.
        path = sim_paths[j]
        queue, ref, entry = c_queue[w], c_ref[w], c_entry[w]
        tokens = prompt_tokens[j]
        junk = -(-(tokens + max_tokens[j] - 1) // bs) - tokens // bs
        freed = junk
        if junk:
            queue.append([_JUNK, junk])
        for node in reversed(path):
            refs = ref.pop(node) - 1
            if refs:
                ref[node] = refs
                continue
            blocks = sim_nb[node]  # referenced blocks are never evicted: all resident
            entry[node] = run = [node, blocks]
            queue.append(run)
            freed += blocks
        c_free[w] += freed
        # The router sees the response end: one less in flight, the chain confirmed.
        value = load[w]
        area[w] += value * (done - since[w])
        since[w] = done
        value -= 1
        load[w] = value
        views[w] = cold[w][value]
        record(w, rt_paths[j], inf)
        schedule(w, done)

    rejected = 0
    for j in range(n_requests):
        now = offsets[j]
        while finishing and finishing[0][0] <= now:
            finish(*heappop(finishing))
        if prompt_tokens[j] + max_tokens[j] > model_len:
            rejected += 1
            continue
        path = rt_paths[j]
        view = views
        if path:
            found = holders.get(path[0])
            if found:
                for w in found:
                    res, exp = i_res[w], i_exp[w]
                    depth = 0
                    for node in path:
                        have = res.get(node, 0)
                        if not have or exp[node] <= now:  # every node holds >= 1 block
                            break
                        depth += have
                        if have < rt_nb[node]:
                            break
                    if depth:
                        if view is views:
                            view = views.copy()
                        mine = warm[w]
                        key = depth << load_bits | load[w]
                        warm_view = mine.get(key)
                        if warm_view is None:
                            warm_view = mine[key] = WorkerView(ids[w], load[w], depth)
                        view[w] = warm_view
        total = rt_totals[j]
        chain = chains.get(total)
        if chain is None:
            chain = chains[total] = (0,) * total
        decision = choose(
            RouteRequest(chain, keys[j], tenant_names[tenant_of[j]]),
            ClusterView.with_ids(tuple(view), ring, tuning, id_set),
        )
        reason = decision.reason
        reasons[reason] = reasons.get(reason, 0) + 1
        matched_total += decision.matched_blocks
        best_total += decision.best_available_blocks
        w = index_of[decision.worker]
        chosen[j] = w
        value = load[w]
        area[w] += value * (now - since[w])
        since[w] = now
        value += 1
        load[w] = value
        row = cold[w]
        if value == len(row):
            row.append(WorkerView(ids[w], value))
        views[w] = row[value]
        if value > peak:
            peak = value
        if path:
            record(w, path, now + ttl)
        line = waiting[w]
        line.append(j)
        if len(line) == 1:  # a longer queue is blocked at its head: nothing changed
            schedule(w, now)
    while finishing:
        finish(*heappop(finishing))

    end = max(since) if n_requests else 0.0
    for w in range(n_workers):
        area[w] += load[w] * (end - since[w])
    ok = [j for j in range(n_requests) if chosen[j] >= 0]
    prompt_sum = sum(prompt_tokens[j] for j in ok)
    cached_sum = sum(cached[j] for j in ok)
    ordered = sorted(ttft[j] for j in ok)
    mean_area = sum(area) / n_workers
    per_worker = [0] * n_workers
    for j in ok:
        per_worker[chosen[j]] += 1
    result = ReplayResult(
        policy=policy,
        tuning=tuning,
        requests=n_requests,
        ok=len(ok),
        rejected=rejected,
        prompt_tokens=prompt_sum,
        cached_tokens=cached_sum,
        ttft_ms={f"p{q}": _ms(percentile_of_sorted(ordered, q)) for q in (50, 95, 99)},
        load_mean=mean_area / end if end > 0 else 0.0,
        load_max_over_mean=max(area) / mean_area if mean_area > 0 else None,
        load_peak=peak,
        decisions=dict(sorted(reasons.items())),
        matched_blocks=matched_total,
        best_available_blocks=best_total,
        simulated_s=end,
        wall_s=time.perf_counter() - started,
        cpu_s=time.process_time() - cpu_started,
        per_worker_requests=per_worker,
    )
    if keep_requests:
        result.per_request = {"worker": chosen, "cached_tokens": cached, "ttft_s": ttft}
    return result
