"""Bounded load: no worker ever takes a request above its cap, and affinity holds below it."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.core.bounded import BoundedLoad, load_cap
from router.core.model import WorkerId
from router.core.ring import HashRing

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None)


def test_cap_is_exact_where_floats_are_not() -> None:
    """The cap is the exact ceiling, not one off from float rounding."""
    assert load_cap(1.25, 7, 2) == 5  # 1.25 * 8 / 2
    assert load_cap(1.1, 9, 1) == 11  # 1.1 * 10 is 11.000000000000002 in floats
    assert load_cap(1.0, 0, 4) == 1
    assert load_cap(1.0, 7, 4) == 2
    assert load_cap(2.0, 0, 1) == 2


@PROPERTY
@given(
    factor_millis=st.integers(1_000, 5_000),
    total=st.integers(0, 10_000),
    n=st.integers(1, 300),
)
def test_cap_matches_exact_rational_arithmetic(factor_millis: int, total: int, n: int) -> None:
    """For factors given in decimals, the cap equals ceil computed over exact fractions."""
    factor = factor_millis / 1000
    exact = Fraction(factor_millis, 1000) * (total + 1) / n
    assert load_cap(factor, total, n) == math.ceil(exact)


def test_cap_needs_workers() -> None:
    """A cap over zero workers is an error, not a division crash."""
    with pytest.raises(ValueError, match="n_workers"):
        load_cap(1.25, 0, 0)


WORKERS = [WorkerId(f"w{i}") for i in range(8)]
RING = HashRing(WORKERS, vnodes=32)

# (action, key, victim): action 0 is a departure from worker `victim`, else an arrival.
operation = st.tuples(st.integers(0, 2), st.integers(0, 2**64 - 1), st.integers(0, 7))


@PROPERTY
@given(
    factor=st.floats(1.0, 3.0),
    n_eligible=st.integers(1, 8),
    operations=st.lists(operation, min_size=40, max_size=120),
)
def test_no_worker_exceeds_the_cap(
    factor: float, n_eligible: int, operations: list[tuple[int, int, int]]
) -> None:
    """Over arrivals and departures, every choice fits under the cap and honours the owner."""
    eligible = WORKERS[:n_eligible]
    loads = dict.fromkeys(eligible, 0)
    bounded = BoundedLoad(RING)
    for action, key, victim in operations:
        if action == 0:
            worker = eligible[victim % n_eligible]
            loads[worker] = max(0, loads[worker] - 1)
            continue
        choice = bounded.choose(key, loads, factor)
        assert choice.worker in loads
        assert choice.cap == load_cap(factor, sum(loads.values()), n_eligible)
        assert loads[choice.worker] + 1 <= choice.cap
        owner = next(w for w in RING.walk(key) if w in loads)
        assert choice.owner == owner
        if loads[owner] + 1 <= choice.cap:
            assert choice.worker == owner
            assert not choice.spilled
        else:
            assert choice.spilled
        loads[choice.worker] += 1


def test_overloaded_owner_spills_to_next_ring_neighbour() -> None:
    """When the key's owner is at its cap, the next worker on the walk takes the request."""
    key = 42
    walk = list(RING.walk(key))
    loads = dict.fromkeys(WORKERS, 0)
    loads[walk[0]] = 3  # total 3 over 8 workers: cap = ceil(1.25 * 4 / 8) = 1
    choice = BoundedLoad(RING).choose(key, loads, 1.25)
    assert (choice.worker, choice.owner, choice.spilled, choice.cap) == (walk[1], walk[0], True, 1)


def test_ineligible_workers_are_skipped() -> None:
    """Unhealthy ring members are never chosen; the owner is the first eligible one."""
    key = 7
    walk = list(RING.walk(key))
    loads = {walk[2]: 0, walk[5]: 0}
    choice = BoundedLoad(RING).choose(key, loads, 1.25)
    assert (choice.worker, choice.owner, choice.spilled) == (walk[2], walk[2], False)


def test_eligible_workers_missing_from_the_ring_still_get_work() -> None:
    """A healthy worker the ring does not know yet is a last resort, under the cap."""
    ring = HashRing([WorkerId("a")])
    loads = {WorkerId("a"): 5, WorkerId("b"): 0}
    choice = BoundedLoad(ring).choose(1, loads, 1.0)
    assert choice.worker == "b"
    assert choice.owner == "a"
    assert loads[WorkerId("b")] + 1 <= choice.cap


def test_no_eligible_workers_is_an_error() -> None:
    """Callers must check for healthy workers first; an empty mapping is refused."""
    with pytest.raises(ValueError, match="eligible"):
        BoundedLoad(RING).choose(1, {}, 1.25)
