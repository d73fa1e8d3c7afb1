"""The consistent-hash ring: stable walk orders, minimal movement on membership changes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.core.model import WorkerId
from router.core.ring import HashRing

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None)

member_sets = st.sets(st.text(min_size=1, max_size=10).map(WorkerId), min_size=1, max_size=12)
keys = st.integers(0, 2**64 - 1)


def _keys(count: int, seed: int = 7) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(64) for _ in range(count)]


@PROPERTY
@given(members=member_sets, key=keys)
def test_walk_yields_every_member_exactly_once(members: set[WorkerId], key: int) -> None:
    """A key can try every worker, each once, starting at its owner."""
    ring = HashRing(members, vnodes=16)
    walk = list(ring.walk(key))
    assert sorted(walk) == sorted(members)
    assert walk[0] == ring.owner(key)
    assert len(ring) == len(members)
    assert ring.members == frozenset(members)


@PROPERTY
@given(members=member_sets, key=keys, data=st.data())
def test_removing_a_member_keeps_everyone_elses_order(
    members: set[WorkerId], key: int, data: st.DataObject
) -> None:
    """Removing a worker moves only its own keys and leaves the others' walk order intact."""
    removed = data.draw(st.sampled_from(sorted(members)))
    full = HashRing(members, vnodes=16)
    reduced = HashRing(members - {removed}, vnodes=16)
    assert list(reduced.walk(key)) == [m for m in full.walk(key) if m != removed]
    if full.owner(key) != removed:
        assert reduced.owner(key) == full.owner(key)


@PROPERTY
@given(members=member_sets, key=keys, data=st.data())
def test_first_in_matches_a_filtered_walk(
    members: set[WorkerId], key: int, data: st.DataObject
) -> None:
    """The first candidate on the walk is found without walking everyone."""
    candidates = data.draw(st.sets(st.sampled_from(sorted(members))))
    ring = HashRing(members, vnodes=16)
    expected = next((m for m in ring.walk(key) if m in candidates), None)
    assert ring.first_in(key, candidates) == expected


@pytest.mark.parametrize("n", [4, 16, 64])
def test_adding_a_member_moves_about_one_nth_of_keys(n: int) -> None:
    """Scaling out by one worker moves roughly 1/(N+1) of keys, all of them to the new one."""
    members = [WorkerId(f"worker-{i}") for i in range(n)]
    before = HashRing(members)
    after = HashRing([*members, WorkerId("newcomer")])
    sample = _keys(20_000)
    moved = [k for k in sample if before.owner(k) != after.owner(k)]
    assert all(after.owner(k) == "newcomer" for k in moved)
    share = len(moved) / len(sample)
    assert 0.4 / (n + 1) < share < 2 / (n + 1)


def test_keys_spread_evenly_over_members() -> None:
    """No worker owns much more than its share of keys (the docstring's balance claim)."""
    members = [WorkerId(f"worker-{i}") for i in range(64)]
    ring = HashRing(members)
    counts = dict.fromkeys(members, 0)
    sample = _keys(64_000, seed=3)
    for k in sample:
        owner = ring.owner(k)
        assert owner is not None
        counts[owner] += 1
    assert max(counts.values()) / (len(sample) / 64) < 1.45


def test_ring_is_independent_of_member_order() -> None:
    """Two replicas listing the same workers in different orders agree on every key."""
    members = [WorkerId(f"http://10.0.0.{i}:8000") for i in range(10)]
    a = HashRing(members)
    b = HashRing(reversed(members))
    for k in _keys(500):
        assert list(a.walk(k)) == list(b.walk(k))


def test_ring_is_identical_across_processes() -> None:
    """A fresh interpreter with another hash seed computes the same owners (no hash())."""
    members = [f"w{i}" for i in range(8)]
    sample = _keys(200)
    script = (
        "import json, sys\n"
        "from router.core.ring import HashRing\n"
        "members, keys = json.load(sys.stdin)\n"
        "ring = HashRing(members)\n"
        "print(json.dumps([list(ring.walk(k))[:3] for k in keys]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps([members, sample]),
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    )
    ring = HashRing([WorkerId(m) for m in members])
    assert json.loads(result.stdout) == [list(ring.walk(k))[:3] for k in sample]


def test_empty_ring_has_no_owner() -> None:
    """With no members there is nobody to route to, and no exception."""
    ring = HashRing([])
    assert ring.owner(123) is None
    assert list(ring.walk(123)) == []
    assert ring.first_in(123, {WorkerId("a")}) is None
    assert len(ring) == 0


def test_vnodes_must_be_positive() -> None:
    """A ring without points is a configuration error."""
    with pytest.raises(ValueError, match="vnodes"):
        HashRing([WorkerId("a")], vnodes=0)
