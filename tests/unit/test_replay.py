"""The offline replay: segment shapes, the simulated cluster, and the live policies over it."""

from __future__ import annotations

import dataclasses
import hashlib
import random

import pytest

import load_tests.replay
from load_tests.replay import ClusterSpec, replay
from load_tests.replay_shapes import ROOT, ChainTrie, ShapedTrace, shape_requests, shape_workload
from load_tests.workload import WorkloadConfig, generate_trace
from router.core.model import ClusterView, Decision, RouteRequest, Tuning
from worker.sim.cache import PrefixCache
from worker.sim.config import DEFAULT_HASH_SEED
from worker.sim.hashing import BlockHasher
from worker.sim.protocol import parse_request
from worker.sim.tokenizer import filler_token

SMALL = WorkloadConfig(
    seed=5, tenants=6, rate=15.0, duration=20.0, head_tokens=(150, 400), version_every=6.0
)


def test_trie_shares_common_prefixes_and_splits_where_chains_diverge() -> None:
    """Two chains share exactly their common leading blocks, wherever they diverge."""
    trie = ChainTrie()
    first = trie.insert([1, 2, 3, 4])
    second = trie.insert([1, 2, 5])
    third = trie.insert([1, 2])
    a, b, c = trie.path(first), trie.path(second), trie.path(third)
    assert a[0] == b[0] == c[0]
    assert len(c) == 1
    assert [trie.blocks[n] for n in a] == [2, 2]
    assert [trie.blocks[n] for n in b] == [2, 1]
    assert trie.key_at(a, 3) == 3
    assert trie.key_at(b, 3) == 5


def test_replay_is_deterministic() -> None:
    """The same trace and settings give the same figures and the same per-request outcome."""
    shaped = shape_workload(SMALL)
    cluster = ClusterSpec(workers=3, cache_blocks=300)
    one = replay(shaped, cluster, Tuning(), keep_requests=True)
    two = replay(shape_workload(SMALL), cluster, Tuning(), keep_requests=True)
    timing = {"wall_s": 0, "cpu_s": 0}
    assert {**one.to_json(), **timing} == {**two.to_json(), **timing}
    assert one.per_request == two.per_request


def test_cached_tokens_never_exceed_prompt_tokens_and_totals_add_up() -> None:
    """Per request, cached <= prompt - 1; the totals are the sums; every request is counted."""
    shaped = shape_requests(generate_trace(SMALL).requests)
    result = replay(shaped, ClusterSpec(workers=2, cache_blocks=200), keep_requests=True)
    assert result.per_request is not None
    cached = result.per_request["cached_tokens"]
    for j, tokens in enumerate(shaped.prompt_tokens):
        assert 0 <= cached[j] <= tokens - 1
    assert result.ok + result.rejected == result.requests == len(shaped)
    assert result.cached_tokens == sum(cached)
    assert result.prompt_tokens == sum(shaped.prompt_tokens)
    assert sum(result.decisions.values()) == result.ok


def test_cache_model_matches_the_simulators_own_cache() -> None:
    """With requests that never overlap, every hit equals the real PrefixCache's hit."""
    config = dataclasses.replace(SMALL, rate=0.5, duration=120.0, burst_every=0.0)
    trace = generate_trace(config)
    cluster = ClusterSpec(workers=2, cache_blocks=120)
    shaped = shape_requests(trace.requests)
    result = replay(shaped, cluster, keep_requests=True)
    assert result.per_request is not None
    assert result.rejected == 0
    caches = [PrefixCache(120, BlockHasher(16, DEFAULT_HASH_SEED)) for _ in range(2)]
    for j, request in enumerate(trace.requests):
        kind = "chat" if request.path.endswith("chat/completions") else "completion"
        parsed = parse_request(kind, request.body, served_model="sim-model", max_model_len=1920)
        cache = caches[result.per_request["worker"][j]]
        ids, salt = parsed.prompt_ids, request.tenant
        allocation = cache.admit(ids, cache.hasher.chain(ids, salt), salt, parsed.max_tokens)
        assert allocation is not None
        assert allocation.hit_tokens == result.per_request["cached_tokens"][j], j
        cache.grow(allocation, [filler_token(i) for i in range(parsed.max_tokens - 1)])
        cache.release(allocation)


def test_structural_shapes_follow_the_real_generator() -> None:
    """Structure mode has the generator's arrivals, tenants, picks and affinity keys exactly."""
    trace = generate_trace(SMALL)
    exact = shape_requests(trace.requests)
    structure = shape_workload(SMALL)
    assert structure.offsets == exact.offsets
    assert structure.streams == exact.streams
    assert structure.max_tokens == exact.max_tokens
    assert [structure.tenant_names[t] for t in structure.tenants] == [
        r.tenant for r in trace.requests
    ]
    assert structure.affinity_keys(8) == exact.affinity_keys(8)
    cluster = ClusterSpec(workers=3, cache_blocks=300)
    ratio_exact = replay(exact, cluster).cached_token_ratio
    ratio_structure = replay(structure, cluster).cached_token_ratio
    assert abs((ratio_exact or 0.0) - (ratio_structure or 1.0)) < 0.05


def test_cache_aware_keeps_more_prompt_cached_than_round_robin() -> None:
    """On tenants sharing long heads, cache_aware's ratio is at least round robin's."""
    shaped = shape_workload(SMALL)
    cluster = ClusterSpec(workers=4, cache_blocks=250)
    aware = replay(shaped, cluster, Tuning(), "cache_aware").cached_token_ratio
    spread = replay(shaped, cluster, Tuning(), "round_robin").cached_token_ratio
    assert (aware or 0.0) > (spread or 1.0)


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded", "consistent_hash"])
def test_one_worker_makes_every_policy_alike(policy: str) -> None:
    """With one worker and no load bound every policy sends everything to it: same ratio."""
    shaped = shape_workload(SMALL)
    cluster = ClusterSpec(workers=1, cache_blocks=300)
    loose = Tuning(load_factor=100.0)
    baseline = replay(shaped, cluster, loose, "cache_aware")
    other = replay(shaped, cluster, loose, policy)
    assert other.cached_tokens == baseline.cached_tokens
    assert other.per_worker_requests == [len(shaped)]


def test_a_bigger_cache_never_lowers_the_ratio_of_a_single_worker() -> None:
    """More KV blocks on one worker keep at least as many prompt tokens cached."""
    shaped = shape_workload(SMALL)
    ratios = [
        replay(shaped, ClusterSpec(workers=1, cache_blocks=blocks)).cached_token_ratio or 0.0
        for blocks in (150, 300, 600, 5000)
    ]
    assert ratios == sorted(ratios)
    assert ratios[-1] > ratios[0]


def test_in_flight_load_never_exceeds_the_bound_by_much() -> None:
    """A tight load factor keeps the busiest worker near the mean; a loose one lets it pile."""
    shaped = shape_workload(dataclasses.replace(SMALL, tenants=2, zipf_exponent=2.0, rate=40.0))
    cluster = ClusterSpec(workers=4, cache_blocks=300)
    tight = replay(shaped, cluster, Tuning(load_factor=1.0))
    loose = replay(shaped, cluster, Tuning(load_factor=50.0))
    assert (tight.load_max_over_mean or 9.0) < (loose.load_max_over_mean or 0.0)


# --- a pinned run -----------------------------------------------------------------------------


def _synthetic_trace(requests: int, seed: int) -> ShapedTrace:
    """Conversations over a few heads, built on the tries directly (no generator involved)."""
    rng = random.Random(seed)
    shaped = ShapedTrace(64, 16)
    rt, sim = shaped.rt_trie, shaped.sim_trie
    known: dict[str, int] = {}
    heads = [
        (rt.extend(ROOT, rng.randint(4, 40)), sim.extend(ROOT, rng.randint(4, 40)))
        for _ in range(10)
    ]
    heads.append((rt.extend(ROOT, 280), sim.extend(ROOT, 301)))  # beyond the model length
    conversations: list[list[int]] = []
    now = 0.0
    for _ in range(requests):
        now += rng.expovariate(150.0)
        if conversations and rng.random() < 0.6:
            conv = rng.choice(conversations)
        else:
            conv = [*rng.choice(heads[: rng.randint(1, len(heads))])]
            conversations.append(conv)
            if len(conversations) > 40:
                conversations.pop(0)
        conv[0] = rt.extend(conv[0], rng.choice((0, 1, 2, 5)))
        conv[1] = sim.extend(conv[1], rng.choice((0, 1, 3, 6)))
        sim_blocks = sum(sim.blocks[n] for n in sim.path(conv[1]))
        shaped._append(
            now,
            rng.random() < 0.5,
            rng.randint(1, 40),
            sim_blocks * 16 + rng.randint(0, 15),
            shaped._tenant_index(f"t{rng.randint(0, 4)}", known),
            conv[0],
            conv[1],
        )
    shaped._finish()
    return shaped


class _Deepest:
    """Deepest warm match, then least loaded, then first; fingerprints every view it gets."""

    name = "deepest"

    def __init__(self) -> None:
        self.digest = hashlib.sha256()

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        total = len(request.chain)
        seen = [(w.id, w.load, w.warm_depth) for w in view.workers]
        self.digest.update(repr((total, request.affinity_key, request.tenant, seen)).encode())
        best = max(range(len(seen)), key=lambda i: (min(seen[i][2], total), -seen[i][1], -i))
        depth = min(seen[best][2], total)
        return Decision(view.workers[best].id, "warm" if depth else "fallback", depth, depth, None)


def test_replay_reproduces_the_figures_of_the_reference_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every view the policy sees and every request's outcome match the first model's run.

    The figures were computed by the replay as first written (before its speed-ups), on a
    trace that evicts from the caches and the index, lets predictions expire, queues,
    rejects and caps hits. A policy defined here keeps them independent of the router's
    own policies (which are tuned over time).
    """
    shaped = _synthetic_trace(6000, 11)
    policy = _Deepest()
    monkeypatch.setattr(load_tests.replay, "make_policy", lambda name: policy)
    cluster = ClusterSpec(workers=5, cache_blocks=300, max_running=6, predicted_ttl_s=0.05)
    result = replay(shaped, cluster, Tuning(), "deepest", keep_requests=True)
    assert result.per_request is not None
    outcome = hashlib.sha256(repr(result.per_request).encode()).hexdigest()
    assert (result.ok, result.rejected, result.cached_tokens, result.load_peak) == (
        5943, 57, 3064048, 16,
    )  # fmt: skip
    assert result.per_worker_requests == [1211, 2935, 670, 777, 350]
    assert result.ttft_ms == {"p50": 23.204, "p95": 102.363, "p99": 104.683}
    assert round(result.load_max_over_mean or 0.0, 4) == 2.5429
    assert policy.digest.hexdigest().startswith("b27ce867d7e30fb1353737a00595753f")
    assert outcome.startswith("47ce1c7101ea38e9900c7c30b1df07af")
