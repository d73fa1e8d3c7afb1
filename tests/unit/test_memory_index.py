"""The embedded warm index: leading-run depths, predicted TTLs, per-worker LRU, tenant scopes."""

from __future__ import annotations

import inspect
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.core.blocks import ApproxHasher, scope_key
from router.core.model import WorkerId
from router.index import Source, WarmIndex
from router.index.memory import MemoryWarmIndex

A = WorkerId("a")
B = WorkerId("b")
TTL = 10.0


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _index(clock: FakeClock, capacity: int = 1000) -> MemoryWarmIndex:
    return MemoryWarmIndex(capacity, TTL, clock=clock)


CHAIN = (11, 12, 13, 14, 15)


def test_memory_index_satisfies_the_protocol() -> None:
    """The embedded index has every WarmIndex method, with the same parameters and async-ness."""
    for name in ("lookup", "record", "remove", "clear", "stats"):
        ours = getattr(MemoryWarmIndex, name)
        theirs = getattr(WarmIndex, name)
        assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(theirs), name
        assert list(inspect.signature(ours).parameters) == list(
            inspect.signature(theirs).parameters
        ), name


async def test_lookup_reports_depth_per_worker(clock: FakeClock) -> None:
    """Each worker's depth is how many leading blocks of the chain it holds."""
    index = _index(clock)
    await index.record(A, CHAIN, "confirmed")
    await index.record(B, CHAIN[:2], "confirmed")
    assert await index.lookup(CHAIN) == {A: 5, B: 2}
    assert await index.lookup(CHAIN[:3]) == {A: 3, B: 2}
    assert await index.lookup((11, 12, 99)) == {A: 2, B: 2}
    assert await index.lookup((99, 11, 12)) == {}
    assert await index.lookup(()) == {}


async def test_depth_is_the_leading_run_only(clock: FakeClock) -> None:
    """A missing block stops the count: blocks after a gap do not add to the depth."""
    index = _index(clock)
    await index.record(A, CHAIN, "confirmed")
    await index.remove(A, [13])
    assert await index.lookup(CHAIN) == {A: 2}
    await index.record(B, CHAIN[1:], "confirmed")  # everything but the head
    assert B not in await index.lookup(CHAIN)


async def test_intersection_stops_at_each_workers_gap(clock: FakeClock) -> None:
    """Workers whose runs end at different blocks each get their own depth."""
    index = _index(clock)
    await index.record(A, CHAIN, "confirmed")
    await index.record(B, CHAIN, "confirmed")
    await index.remove(B, [14])
    await index.remove(A, [12])
    assert await index.lookup(CHAIN) == {A: 1, B: 3}


async def test_predicted_entries_expire_after_the_ttl(clock: FakeClock) -> None:
    """A prediction counts as warm until the TTL passes, then no longer."""
    index = _index(clock)
    await index.record(A, CHAIN, "predicted")
    clock.now += TTL - 0.001
    assert await index.lookup(CHAIN) == {A: 5}
    clock.now += 0.002
    assert await index.lookup(CHAIN) == {}


async def test_confirmed_entries_never_expire(clock: FakeClock) -> None:
    """A confirmed chain stays warm however much time passes."""
    index = _index(clock)
    await index.record(A, CHAIN, "confirmed")
    clock.now += 1e9
    assert await index.lookup(CHAIN) == {A: 5}


async def test_confirmation_outlives_the_prediction(clock: FakeClock) -> None:
    """Confirming a predicted chain makes it permanent; a later prediction does not shorten it."""
    index = _index(clock)
    await index.record(A, CHAIN, "predicted")
    await index.record(A, CHAIN[:3], "confirmed")
    await index.record(A, CHAIN, "predicted")
    clock.now += TTL * 10
    assert await index.lookup(CHAIN) == {A: 3}


async def test_re_predicting_extends_the_ttl(clock: FakeClock) -> None:
    """Routing the same chain again refreshes its prediction."""
    index = _index(clock)
    await index.record(A, CHAIN, "predicted")
    clock.now += TTL * 0.8
    await index.record(A, CHAIN, "predicted")
    clock.now += TTL * 0.8
    assert await index.lookup(CHAIN) == {A: 5}


async def test_expired_prediction_on_one_worker_leaves_others(clock: FakeClock) -> None:
    """One worker's expired prediction does not hide another worker's confirmed blocks."""
    index = _index(clock)
    await index.record(A, CHAIN, "predicted")
    await index.record(B, CHAIN[:2], "confirmed")
    clock.now += TTL + 1
    assert await index.lookup(CHAIN) == {B: 2}


async def test_capacity_is_bounded_per_worker(clock: FakeClock) -> None:
    """No worker holds more than capacity blocks, and one worker's load does not evict another's."""
    index = _index(clock, capacity=4)
    await index.record(A, (1, 2, 3), "confirmed")
    await index.record(B, tuple(range(100, 110)), "confirmed")
    assert index.stats() == {A: 3, B: 4}
    assert await index.lookup((1, 2, 3)) == {A: 3}


async def test_a_chains_tail_is_evicted_before_its_head(clock: FakeClock) -> None:
    """When a chain does not fit, its head stays warm and its tail is dropped."""
    index = _index(clock, capacity=3)
    await index.record(A, CHAIN, "confirmed")
    assert await index.lookup(CHAIN) == {A: 3}
    assert index.stats() == {A: 3}


async def test_older_chains_tails_go_first(clock: FakeClock) -> None:
    """Under pressure the least recent chain loses its tail first, keeping its head warm."""
    index = _index(clock, capacity=6)
    old = (1, 2, 3, 4)
    new = (5, 6, 7, 8)
    await index.record(A, old, "confirmed")
    await index.record(A, new, "confirmed")
    assert await index.lookup(old) == {A: 2}
    assert await index.lookup(new) == {A: 4}


async def test_recording_again_makes_a_chain_recent(clock: FakeClock) -> None:
    """A chain that was routed again is kept over one that was not."""
    index = _index(clock, capacity=6)
    first, second, third = (1, 2), (3, 4), (5, 6, 7, 8)
    await index.record(A, first, "confirmed")
    await index.record(A, second, "confirmed")
    await index.record(A, first, "confirmed")
    await index.record(A, third, "confirmed")
    assert await index.lookup(first) == {A: 2}
    assert await index.lookup(second) == {}
    assert await index.lookup(third) == {A: 4}


async def test_remove_forgets_only_the_given_blocks_on_that_worker(clock: FakeClock) -> None:
    """remove drops the named blocks on one worker; other workers keep theirs."""
    index = _index(clock)
    await index.record(A, CHAIN, "confirmed")
    await index.record(B, CHAIN, "confirmed")
    await index.remove(A, CHAIN[3:])
    await index.remove(A, [999])  # unknown blocks are ignored
    await index.remove(WorkerId("nobody"), CHAIN)  # unknown workers too
    assert await index.lookup(CHAIN) == {A: 3, B: 5}
    assert index.stats() == {A: 3, B: 5}


async def test_clear_forgets_a_worker_entirely(clock: FakeClock) -> None:
    """clear removes every block of one worker (removed or restarted) and nothing else."""
    index = _index(clock)
    await index.record(A, CHAIN, "confirmed")
    await index.record(B, CHAIN[:2], "predicted")
    await index.clear(A)
    await index.clear(WorkerId("nobody"))
    assert await index.lookup(CHAIN) == {B: 2}
    assert index.stats() == {B: 2}
    await index.clear(B)
    assert await index.lookup(CHAIN) == {}
    assert index.stats() == {}


async def test_stats_count_blocks_per_worker(clock: FakeClock) -> None:
    """stats reports how many distinct blocks each worker holds, shared blocks counted once."""
    index = _index(clock)
    await index.record(A, (1, 2, 3), "confirmed")
    await index.record(A, (1, 2, 4), "predicted")
    await index.record(B, (9,), "confirmed")
    assert index.stats() == {A: 4, B: 1}


async def test_tenants_with_identical_text_never_share_warm_blocks(clock: FakeClock) -> None:
    """Two tenants sending the same prompt get disjoint chains, so one's cache never leaks."""
    hasher = ApproxHasher(block_chars=16)
    text = "You are a helpful assistant. " * 20
    acme = hasher.chain(scope_key("acme", "m"), text)
    globex = hasher.chain(scope_key("globex", "m"), text)
    assert len(acme) == len(globex) > 0
    assert not set(acme) & set(globex)
    index = _index(clock)
    await index.record(A, acme, "confirmed")
    assert await index.lookup(globex) == {}
    assert await index.lookup(acme) == {A: len(acme)}


def test_capacity_must_be_positive(clock: FakeClock) -> None:
    """A zero-block index is a configuration mistake and is refused."""
    with pytest.raises(ValueError, match="capacity_blocks"):
        MemoryWarmIndex(0, TTL, clock=clock)


chains = st.lists(st.integers(0, 40), min_size=1, max_size=12, unique=True).map(tuple)
histories = st.lists(
    st.tuples(
        st.sampled_from([A, B, WorkerId("c")]),
        chains,
        st.sampled_from(["predicted", "confirmed"]),
        st.sampled_from([0.0, 0.0, TTL / 3]),
    ),
    min_size=1,
    max_size=10,
)


@settings(max_examples=120, deadline=None, derandomize=True, database=None)
@given(recorded=histories, probe=chains, capacity=st.integers(1, 30))
def test_depth_matches_a_naive_model(
    recorded: list[tuple[WorkerId, tuple[int, ...], Source, float]],
    probe: tuple[int, ...],
    capacity: int,
) -> None:
    """Depths equal each worker's leading run of live blocks, for any history of records."""
    clock = FakeClock()
    index = MemoryWarmIndex(capacity, TTL, clock=clock)
    order: dict[WorkerId, list[int]] = {}  # least recent first
    expiry: dict[WorkerId, dict[int, float]] = {}
    for worker, chain, source, advance in recorded:
        clock.now += advance
        index.record_sync(worker, chain, source)
        until = math.inf if source == "confirmed" else clock.now + TTL
        blocks, expires = order.setdefault(worker, []), expiry.setdefault(worker, {})
        for block in reversed(chain):
            if block in blocks:
                blocks.remove(block)
            blocks.append(block)
            expires[block] = max(expires.get(block, 0.0), until)
        while len(blocks) > capacity:
            expires.pop(blocks.pop(0))
    clock.now += TTL / 2
    for chain in (probe, *(entry[1] for entry in recorded)):
        expected: dict[WorkerId, int] = {}
        for worker, expires in expiry.items():
            depth = 0
            for block in chain:
                if expires.get(block, 0.0) <= clock.now:
                    break
                depth += 1
            if depth:
                expected[worker] = depth
        assert index.lookup_sync(chain) == expected, chain
    assert index.stats() == {w: len(blocks) for w, blocks in order.items()}
