"""Routing policies: warm prefixes attract requests, hot prefixes spill, nobody exceeds the cap."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.core.blocks import affinity_key
from router.core.bounded import BoundedLoad, load_cap
from router.core.model import (
    ClusterView,
    Decision,
    RouteRequest,
    Tuning,
    WorkerId,
    WorkerView,
)
from router.core.policies import POLICY_NAMES, make_policy
from router.core.policies.cache_aware import CacheAware
from router.core.policies.consistent_hash import ConsistentHash
from router.core.policies.least_loaded import LeastLoaded
from router.core.policies.round_robin import RoundRobin
from router.core.ring import HashRing

PROPERTY = settings(max_examples=50, deadline=None, derandomize=True, database=None)

WORKERS = [WorkerId(f"w{i}") for i in range(4)]
RING = HashRing(WORKERS, vnodes=64)
CHAIN = tuple(range(1000, 1010))  # ten blocks
KEY = affinity_key(CHAIN, 8)
WALK = list(RING.walk(KEY)) if KEY is not None else []


FORMULA = Tuning(load_floor=0)
"""The bounded-load formula alone: these tests pin its caps at small loads."""


def request(chain: tuple[int, ...] = CHAIN, key: int | None = KEY) -> RouteRequest:
    return RouteRequest(chain=chain, affinity_key=key)


def cluster(
    loads: Mapping[WorkerId, int],
    depths: Mapping[WorkerId, int] | None = None,
    tuning: Tuning | None = None,
    ring: HashRing = RING,
) -> ClusterView:
    depths = depths or {}
    workers = tuple(WorkerView(w, load, depths.get(w, 0)) for w, load in loads.items())
    return ClusterView(workers, ring, tuning or FORMULA)


def idle() -> dict[WorkerId, int]:
    return dict.fromkeys(WORKERS, 0)


# --- cache_aware -------------------------------------------------------------------------


def test_warm_worker_is_chosen_when_under_cap() -> None:
    """A request goes where its whole prefix is warm, even if that is not the ring owner."""
    warm = WALK[2]
    loads = dict.fromkeys(WORKERS, 1)  # cap = ceil(1.25 * 5 / 4) = 2
    decision = CacheAware().choose(request(), cluster(loads, {warm: 10, WALK[0]: 3}))
    assert decision == Decision(
        worker=warm,
        reason="warm",
        matched_blocks=10,
        best_available_blocks=10,
        affinity_worker=WALK[0],
        cap=2,
        total_blocks=10,
    )


def test_hot_prefix_spills_to_next_ring_neighbour() -> None:
    """When the warm owner is at its cap, the next worker on the ring walk takes the request."""
    loads = idle()
    loads[WALK[0]] = 2  # total 2: cap = ceil(1.25 * 3 / 4) = 1, so WALK[0] is full
    decision = CacheAware().choose(request(), cluster(loads, {WALK[0]: 10}))
    assert (decision.worker, decision.reason) == (WALK[1], "spill")
    assert (decision.matched_blocks, decision.best_available_blocks) == (0, 10)
    assert decision.affinity_worker == WALK[0]
    assert loads[decision.worker] + 1 <= (decision.cap or 0)


def test_spill_prefers_a_shallower_warm_copy_under_cap() -> None:
    """A hot prefix already replicated elsewhere spills to that replica, not to a cold worker."""
    loads = idle()
    loads[WALK[0]] = 2
    decision = CacheAware().choose(request(), cluster(loads, {WALK[0]: 10, WALK[3]: 6}))
    assert (decision.worker, decision.reason, decision.matched_blocks) == (WALK[3], "spill", 6)


def test_warm_workers_at_cap_are_never_chosen() -> None:
    """Every warm worker at its cap: the request goes cold rather than above the cap."""
    loads = {WALK[0]: 3, WALK[1]: 3, WALK[2]: 0, WALK[3]: 0}  # cap = ceil(1.25 * 7 / 4) = 3
    decision = CacheAware().choose(request(), cluster(loads, {WALK[0]: 10, WALK[1]: 10}))
    assert (decision.worker, decision.reason, decision.cap) == (WALK[2], "spill", 3)


def test_short_matches_below_min_match_blocks_are_ignored() -> None:
    """A one-block match does not pull a request off its ring owner when two are required."""
    view = cluster(idle(), {WALK[1]: 1}, Tuning(min_match_blocks=2, load_floor=0))
    decision = CacheAware().choose(request(), view)
    assert (decision.worker, decision.reason) == (WALK[0], "affinity")
    assert decision.best_available_blocks == 1
    view = cluster(idle(), {WALK[1]: 2}, Tuning(min_match_blocks=2, load_floor=0))
    assert CacheAware().choose(request(), view).worker == WALK[1]


def test_min_match_ratio_is_respected() -> None:
    """A match covering less than min_match_ratio of the prompt routes by affinity instead."""
    depths = {WALK[1]: 3}  # 3 of 10 blocks
    below = cluster(idle(), depths, Tuning(min_match_ratio=0.31, load_floor=0))
    assert CacheAware().choose(request(), below).reason == "affinity"
    at = cluster(idle(), depths, Tuning(min_match_ratio=0.3, load_floor=0))  # exactly 0.3 counts
    decision = CacheAware().choose(request(), at)
    assert (decision.worker, decision.reason) == (WALK[1], "warm")


def test_equal_matches_prefer_lower_load_then_ring_order() -> None:
    """Among equally warm workers the less loaded wins; equal loads follow the ring walk."""
    depths = {WALK[1]: 5, WALK[3]: 5}
    loads = idle()
    loads[WALK[1]] = 1
    assert CacheAware().choose(request(), cluster(loads, depths)).worker == WALK[3]
    assert CacheAware().choose(request(), cluster(idle(), depths)).worker == WALK[1]


def test_cold_request_goes_to_ring_owner() -> None:
    """With nothing warm, a request goes to the owner of its prefix head."""
    decision = CacheAware().choose(request(), cluster(idle()))
    assert (decision.worker, decision.reason, decision.matched_blocks) == (WALK[0], "affinity", 0)


def test_request_without_key_goes_to_least_loaded() -> None:
    """A prompt shorter than one block has nothing to be affine to: least loaded, fallback."""
    loads = {WorkerId("w0"): 2, WorkerId("w1"): 1, WorkerId("w2"): 0, WorkerId("w3"): 0}
    decision = CacheAware().choose(request((), None), cluster(loads))
    assert decision == Decision(
        worker=WorkerId("w2"),
        reason="fallback",
        matched_blocks=0,
        best_available_blocks=0,
        affinity_worker=None,
        cap=load_cap(1.25, 3, 4),
        total_blocks=0,
    )


def test_unhealthy_ring_owner_is_skipped() -> None:
    """Ring members missing from the view are never chosen; the next healthy one owns the key."""
    loads = {w: 0 for w in WALK[1:]}
    decision = CacheAware().choose(request(), cluster(loads))
    assert (decision.worker, decision.affinity_worker, decision.reason) == (
        WALK[1],
        WALK[1],
        "affinity",
    )


# (action, pick): action 0 finishes a request in flight, anything else is an arrival, so the
# stream builds up concurrency; min_size keeps every example long enough to reach the caps.
hot_ops = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 63)), min_size=80, max_size=160)


@PROPERTY
@given(
    n_workers=st.integers(1, 12),
    factor=st.floats(1.0, 2.5),
    min_blocks=st.integers(1, 4),
    operations=hot_ops,
)
def test_hot_tenant_stream_never_exceeds_cap(
    n_workers: int, factor: float, min_blocks: int, operations: list[tuple[int, int]]
) -> None:
    """One hot tenant at high concurrency spreads out instead of piling onto one worker."""
    workers = [WorkerId(f"node-{i}") for i in range(n_workers)]
    ring = HashRing(workers, vnodes=32)
    tuning = Tuning(load_factor=factor, min_match_blocks=min_blocks, load_floor=0)
    policy = CacheAware()
    loads = dict.fromkeys(workers, 0)
    depths: dict[WorkerId, int] = {}
    in_flight: list[WorkerId] = []
    hot = tuple(range(7, 27))
    for action, pick in operations:
        if action == 0 and in_flight:
            done = in_flight.pop(pick % len(in_flight))
            loads[done] -= 1
            continue
        # The hot head is shared; the tail differs per request.
        chain = hot[:16] + (pick, pick + 1)
        view = cluster(loads, {w: min(d, 16) for w, d in depths.items()}, tuning, ring)
        decision = policy.choose(RouteRequest(chain, affinity_key(chain, 8)), view)
        cap = load_cap(factor, sum(loads.values()), n_workers)
        assert decision.cap == cap
        assert loads[decision.worker] + 1 <= cap
        best = max(depths.values(), default=0)
        if decision.reason == "warm":
            assert decision.matched_blocks == best >= min_blocks
        if best >= min_blocks and any(depths.get(w, 0) == best and loads[w] < cap for w in workers):
            assert decision.reason == "warm"
        loads[decision.worker] += 1
        in_flight.append(decision.worker)
        depths[decision.worker] = 16


worker_views = st.lists(
    st.tuples(st.integers(0, 20), st.integers(0, 12)), min_size=1, max_size=8
).map(
    lambda rows: tuple(
        WorkerView(WorkerId(f"w{i}"), load, depth) for i, (load, depth) in enumerate(rows)
    )
)


@PROPERTY
@given(
    workers=worker_views,
    n_blocks=st.integers(0, 12),
    has_key=st.booleans(),
    factor=st.floats(1.0, 3.0),
    name=st.sampled_from(POLICY_NAMES),
)
def test_decisions_are_consistent(
    workers: tuple[WorkerView, ...], n_blocks: int, has_key: bool, factor: float, name: str
) -> None:
    """Every policy picks a healthy worker and explains its choice truthfully."""
    ring = HashRing([*(w.id for w in workers), WorkerId("down")], vnodes=16)
    chain = tuple(range(500, 500 + n_blocks))
    key = affinity_key(chain, 8) if has_key else None
    if has_key and key is None:
        key = 99  # a prompt_cache_key with an empty chain
    view = ClusterView(workers, ring, Tuning(load_factor=factor, load_floor=0))
    decision = make_policy(name).choose(RouteRequest(chain, key), view)
    chosen = next(w for w in workers if w.id == decision.worker)
    assert decision.total_blocks == n_blocks
    assert decision.matched_blocks == min(chosen.warm_depth, n_blocks)
    assert decision.best_available_blocks == min(max(w.warm_depth for w in workers), n_blocks)
    expected_owner = None if key is None else next(m for m in ring.walk(key) if m != "down")
    assert decision.affinity_worker == expected_owner
    if name in ("consistent_hash", "cache_aware"):
        assert decision.cap == load_cap(factor, sum(w.load for w in workers), len(workers))
        assert chosen.load + 1 <= decision.cap
    else:
        assert decision.cap is None
        assert decision.reason == "fallback"


# --- consistent_hash ---------------------------------------------------------------------


def test_consistent_hash_follows_the_owner_then_spills() -> None:
    """The ring owner takes the key until its cap; then the next neighbour does."""
    policy = ConsistentHash()
    decision = policy.choose(request(), cluster(idle(), {WALK[2]: 10}))
    assert (decision.worker, decision.reason, decision.matched_blocks) == (WALK[0], "affinity", 0)
    loads = idle()
    loads[WALK[0]] = 2
    decision = policy.choose(request(), cluster(loads))
    assert (decision.worker, decision.reason, decision.affinity_worker) == (
        WALK[1],
        "spill",
        WALK[0],
    )


def test_consistent_hash_without_key_falls_back_to_least_loaded() -> None:
    """No key: least loaded, reason fallback."""
    loads = {WorkerId("w0"): 1, WorkerId("w1"): 0, WorkerId("w2"): 3}
    decision = ConsistentHash().choose(request((), None), cluster(loads))
    assert (decision.worker, decision.reason) == ("w1", "fallback")


# --- least_loaded and round_robin --------------------------------------------------------


def test_least_loaded_picks_the_minimum() -> None:
    """The least busy worker gets the request, warm or not."""
    loads = {WorkerId("w0"): 4, WorkerId("w1"): 2, WorkerId("w2"): 1, WorkerId("w3"): 3}
    decision = LeastLoaded().choose(request(), cluster(loads, {WorkerId("w0"): 10}))
    assert (decision.worker, decision.reason, decision.cap) == ("w2", "fallback", None)


def test_least_loaded_breaks_ties_by_ring_order_then_id() -> None:
    """Equal loads keep a prefix on its ring owner; without a key the smallest id wins."""
    assert LeastLoaded().choose(request(), cluster(idle())).worker == WALK[0]
    assert LeastLoaded().choose(request((), None), cluster(idle())).worker == "w0"


def test_round_robin_cycles_in_id_order() -> None:
    """Round robin visits every healthy worker once per cycle, in a stable order."""
    policy = RoundRobin()
    view = cluster(idle())
    chosen = [policy.choose(request(), view).worker for _ in range(8)]
    assert chosen == ["w0", "w1", "w2", "w3"] * 2
    assert Counter(policy.choose(request(), view).reason for _ in range(4)) == {"fallback": 4}


def test_round_robin_keeps_rotating_through_membership_changes() -> None:
    """A worker leaving mid-cycle does not make round robin repeat or skip the others."""
    policy = RoundRobin()
    policy.choose(request(), cluster(idle()))  # w0
    without_w1 = cluster({w: 0 for w in WORKERS if w != "w1"})
    assert [policy.choose(request(), without_w1).worker for _ in range(3)] == ["w2", "w3", "w0"]


# --- registry ----------------------------------------------------------------------------


def test_every_policy_name_has_a_constructor() -> None:
    """Each configured policy name builds a fresh policy that reports that name."""
    assert set(POLICY_NAMES) == {"round_robin", "least_loaded", "consistent_hash", "cache_aware"}
    for name in POLICY_NAMES:
        policy = make_policy(name)
        assert policy.name == name
        assert make_policy(name) is not policy


def test_unknown_policy_name_is_rejected() -> None:
    """A typo in the config fails with the list of valid names."""
    with pytest.raises(ValueError, match="cache_aware"):
        make_policy("cache-aware")


# --- load_floor ------------------------------------------------------------------------------


def test_a_nearly_idle_warm_worker_keeps_its_prefix_under_the_floor() -> None:
    """With the default floor, a warm worker with a few requests in flight is not left for a
    cold one, although the formula alone would spill (cap 1 with one request in flight)."""
    loads = {**idle(), WALK[0]: 1}
    strict = CacheAware().choose(request(), cluster(loads, {WALK[0]: 10}))
    floored = CacheAware().choose(request(), cluster(loads, {WALK[0]: 10}, Tuning()))
    assert (strict.reason, strict.cap) == ("spill", 1)
    assert (floored.worker, floored.reason, floored.cap) == (WALK[0], "warm", 4)


def test_the_floor_gives_way_to_the_formula_under_real_load() -> None:
    """Once loads are above the floor the cap is the formula's, and a worker at it spills."""
    loads = {w: 10 for w in WORKERS}
    loads[WALK[0]] = 14  # cap = ceil(1.25 * 45 / 4) = 15 -> 14 + 1 <= 15 still fits
    fits = CacheAware().choose(request(), cluster(loads, {WALK[0]: 10}, Tuning()))
    loads[WALK[0]] = 15
    full = CacheAware().choose(request(), cluster(loads, {WALK[0]: 10}, Tuning()))
    assert (fits.worker, fits.cap) == (WALK[0], 15)
    assert full.worker != WALK[0]
    assert full.reason == "spill"


@given(
    loads=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    factor=st.floats(1.0, 3.0),
    floor=st.integers(0, 16),
)
@PROPERTY
def test_cap_with_a_floor_always_leaves_a_worker_to_take_the_request(
    loads: list[int], factor: float, floor: int
) -> None:
    """The floor only raises the cap, so some worker is always under it."""
    cap = load_cap(factor, sum(loads), len(loads), floor)
    assert cap >= floor
    assert cap >= load_cap(factor, sum(loads), len(loads))
    assert min(loads) + 1 <= cap


# --- affinity_choices ------------------------------------------------------------------------


def test_a_cold_prefix_goes_to_the_less_loaded_of_its_first_two_ring_workers() -> None:
    """With two choices a new prefix avoids a busier ring owner; with one it stays there."""
    loads = {**idle(), WALK[0]: 3, WALK[1]: 1}
    two = CacheAware().choose(request(), cluster(loads, tuning=Tuning()))
    one = CacheAware().choose(request(), cluster(loads, tuning=Tuning(affinity_choices=1)))
    assert (two.worker, two.reason, two.affinity_worker) == (WALK[1], "affinity", WALK[0])
    assert (one.worker, one.reason) == (WALK[0], "affinity")


def test_equal_loads_keep_the_ring_owner() -> None:
    """Ties go to walk order, so an idle cluster places every prefix on its owner."""
    decision = CacheAware().choose(request(), cluster(idle(), tuning=Tuning()))
    assert (decision.worker, decision.reason) == (WALK[0], "affinity")


@given(
    loads=st.lists(st.integers(0, 12), min_size=4, max_size=4),
    choices=st.integers(1, 4),
    floor=st.integers(0, 6),
)
@PROPERTY
def test_k_choices_pick_the_least_loaded_of_the_first_k_under_the_cap(
    loads: list[int], choices: int, floor: int
) -> None:
    """The choice is under the cap, among the first k under-cap workers of the walk, and
    no busier than any of them; `spilled` says exactly whether the owner was full."""
    by_worker = dict(zip(WORKERS, loads, strict=True))
    choice = BoundedLoad(RING).choose(KEY or 0, by_worker, 1.25, floor, choices)
    under = [w for w in RING.walk(KEY or 0) if by_worker[w] < choice.cap][:choices]
    assert choice.worker in under
    assert by_worker[choice.worker] == min(by_worker[w] for w in under)
    assert choice.spilled == (by_worker[WALK[0]] >= choice.cap)


def test_view_with_precomputed_ids_decides_like_a_built_one() -> None:
    """A view handed its id set (the offline replay's fast path) routes exactly as one that
    computes it."""
    ids = [WorkerId(f"w{i}") for i in range(6)]
    ring = HashRing(ids)
    workers = tuple(
        WorkerView(w, load=i % 3, warm_depth=(4 if i == 2 else 0)) for i, w in enumerate(ids)
    )
    built = ClusterView(workers, ring, Tuning())
    handed = ClusterView.with_ids(workers, ring, Tuning(), frozenset(ids))
    # Every field, so a field added to ClusterView but not to with_ids fails here.
    for name in (f.name for f in dataclasses.fields(ClusterView)):
        assert getattr(handed, name) == getattr(built, name), name
    policy = make_policy("cache_aware")
    for key in range(0, 2**64, 2**58):
        request = RouteRequest(chain=(1, 2, 3, 4, 5), affinity_key=key, tenant="t")
        assert policy.choose(request, handed) == policy.choose(request, built)
