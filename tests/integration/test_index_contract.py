"""One contract for every WarmIndex: the embedded memory index and the shared Redis index
(against a real redis-server) must answer alike. Chains are looked up from their head, as the
router's always are. Expiry runs on an injected clock, never on sleeps."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from router.core.blocks import ApproxHasher, scope_key
from router.core.model import WorkerId
from router.index import WarmIndex
from router.index.memory import MemoryWarmIndex
from router.index.redis import RedisWarmIndex

A, B, C, D = WorkerId("a"), WorkerId("b"), WorkerId("c"), WorkerId("d")
TTL = 10.0
CHAIN = (11, 12, 13, 14, 15)


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


MakeIndex = Callable[..., Awaitable[WarmIndex]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "redis"])
async def make_index(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[MakeIndex]:
    """Builds the index under test with a given capacity, on the shared fake clock."""
    opened: list[RedisWarmIndex] = []

    async def make(capacity: int = 1000) -> WarmIndex:
        if request.param == "memory":
            return MemoryWarmIndex(capacity, TTL, clock=clock)
        server = request.getfixturevalue("redis_server")
        index = RedisWarmIndex(
            server.url, capacity_blocks=capacity, predicted_ttl_s=TTL, clock=clock
        )
        await index.start()
        assert index.available
        opened.append(index)
        return index

    yield make
    for index in opened:
        await index.close()


def test_redis_index_satisfies_the_protocol() -> None:
    """The Redis index has every WarmIndex method, with the same parameters and async-ness."""
    for name in ("lookup", "record", "remove", "clear", "stats"):
        ours = getattr(RedisWarmIndex, name)
        theirs = getattr(WarmIndex, name)
        assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(theirs), name
        assert list(inspect.signature(ours).parameters) == list(
            inspect.signature(theirs).parameters
        ), name


async def test_lookup_reports_each_workers_leading_depth(make_index: MakeIndex) -> None:
    """Each worker's depth is how many leading blocks of the chain it holds."""
    index = await make_index()
    await index.record(A, CHAIN, "confirmed")
    await index.record(B, CHAIN[:2], "confirmed")
    assert await index.lookup(CHAIN) == {A: 5, B: 2}
    assert await index.lookup(CHAIN[:3]) == {A: 3, B: 2}
    assert await index.lookup((11, 12, 99, 14)) == {A: 2, B: 2}
    assert await index.lookup((99, 11, 12)) == {}
    assert await index.lookup(()) == {}


async def test_depth_is_the_leading_run_only(make_index: MakeIndex) -> None:
    """A missing block stops the count: blocks after a gap add nothing, and no head means 0."""
    index = await make_index()
    await index.record(A, CHAIN, "confirmed")
    await index.remove(A, [13])
    assert await index.lookup(CHAIN) == {A: 2}
    await index.remove(A, [11])
    assert await index.lookup(CHAIN) == {}


async def test_several_workers_narrow_to_their_own_depths(make_index: MakeIndex) -> None:
    """Workers sharing a head each get the length of their own run, however they diverge."""
    index = await make_index()
    for worker in (A, B, C, D):
        await index.record(worker, CHAIN, "confirmed")
    await index.remove(B, [14])
    await index.remove(C, [12])
    await index.remove(D, CHAIN[1:])
    await index.record(WorkerId("e"), (11, 12, 77, 78), "confirmed")
    assert await index.lookup(CHAIN) == {A: 5, B: 3, C: 1, D: 1, WorkerId("e"): 2}
    assert await index.lookup((11, 12, 77, 78, 79)) == {
        A: 2,
        B: 2,
        C: 1,
        D: 1,
        WorkerId("e"): 4,
    }


async def test_predicted_entries_expire_after_the_ttl(
    make_index: MakeIndex, clock: FakeClock
) -> None:
    """A prediction counts as warm until the TTL passes, then no longer."""
    index = await make_index()
    await index.record(A, CHAIN, "predicted")
    clock.now += TTL - 0.001
    assert await index.lookup(CHAIN) == {A: 5}
    clock.now += 0.002
    assert await index.lookup(CHAIN) == {}


async def test_confirmed_entries_never_expire(make_index: MakeIndex, clock: FakeClock) -> None:
    """A confirmed chain stays warm however much time passes."""
    index = await make_index()
    await index.record(A, CHAIN, "confirmed")
    clock.now += 1e8
    assert await index.lookup(CHAIN) == {A: 5}


async def test_confirmation_outlives_the_prediction(
    make_index: MakeIndex, clock: FakeClock
) -> None:
    """Confirming part of a predicted chain makes that part permanent; a later prediction
    does not shorten it, and the unconfirmed rest still expires."""
    index = await make_index()
    await index.record(A, CHAIN, "predicted")
    await index.record(A, CHAIN[:3], "confirmed")
    await index.record(A, CHAIN, "predicted")
    assert await index.lookup(CHAIN) == {A: 5}
    clock.now += TTL * 10
    assert await index.lookup(CHAIN) == {A: 3}


async def test_re_predicting_extends_the_ttl(make_index: MakeIndex, clock: FakeClock) -> None:
    """Routing the same chain again refreshes its prediction."""
    index = await make_index()
    await index.record(A, CHAIN, "predicted")
    clock.now += TTL * 0.8
    await index.record(A, CHAIN, "predicted")
    clock.now += TTL * 0.8
    assert await index.lookup(CHAIN) == {A: 5}


async def test_expired_prediction_on_one_worker_leaves_others(
    make_index: MakeIndex, clock: FakeClock
) -> None:
    """One worker's expired prediction does not hide another worker's confirmed blocks."""
    index = await make_index()
    await index.record(A, CHAIN, "predicted")
    await index.record(B, CHAIN[:2], "confirmed")
    clock.now += TTL + 1
    assert await index.lookup(CHAIN) == {B: 2}


async def test_capacity_is_bounded_per_worker(make_index: MakeIndex) -> None:
    """No worker holds more than capacity blocks, and one worker's load does not evict another's."""
    index = await make_index(capacity=4)
    await index.record(A, (1, 2, 3), "confirmed")
    await index.record(B, tuple(range(100, 110)), "confirmed")
    assert index.stats() == {A: 3, B: 4}
    assert await index.lookup((1, 2, 3)) == {A: 3}
    assert await index.lookup(tuple(range(100, 110))) == {B: 4}


async def test_a_chains_tail_is_evicted_before_its_head(make_index: MakeIndex) -> None:
    """When a chain does not fit, its head stays warm and its tail is dropped."""
    index = await make_index(capacity=3)
    await index.record(A, CHAIN, "confirmed")
    assert await index.lookup(CHAIN) == {A: 3}
    assert index.stats() == {A: 3}


async def test_older_chains_lose_their_tails_first(make_index: MakeIndex) -> None:
    """Under pressure the least recent chain loses its tail first, keeping its head warm."""
    index = await make_index(capacity=6)
    old, new = (1, 2, 3, 4), (5, 6, 7, 8)
    await index.record(A, old, "confirmed")
    await index.record(A, new, "confirmed")
    assert await index.lookup(old) == {A: 2}
    assert await index.lookup(new) == {A: 4}


async def test_recording_again_makes_a_chain_recent(make_index: MakeIndex) -> None:
    """A chain that was routed again is kept over one that was not."""
    index = await make_index(capacity=6)
    first, second, third = (1, 2), (3, 4), (5, 6, 7, 8)
    await index.record(A, first, "confirmed")
    await index.record(A, second, "confirmed")
    await index.record(A, first, "predicted")
    await index.record(A, third, "confirmed")
    assert await index.lookup(first) == {A: 2}
    assert await index.lookup(second) == {}
    assert await index.lookup(third) == {A: 4}


async def test_remove_forgets_only_the_given_blocks_on_that_worker(make_index: MakeIndex) -> None:
    """remove drops the named blocks on one worker; other workers keep theirs."""
    index = await make_index()
    await index.record(A, CHAIN, "confirmed")
    await index.record(B, CHAIN, "predicted")
    await index.remove(A, CHAIN[3:])
    await index.remove(A, [999])  # unknown blocks are ignored
    await index.remove(WorkerId("nobody"), CHAIN)  # unknown workers too
    await index.remove(A, [])
    assert await index.lookup(CHAIN) == {A: 3, B: 5}
    assert index.stats() == {A: 3, B: 5}


async def test_clear_forgets_a_worker_entirely(make_index: MakeIndex) -> None:
    """clear removes every block of one worker (removed or restarted) and nothing else."""
    index = await make_index()
    await index.record(A, CHAIN, "confirmed")
    await index.record(A, (21, 22), "predicted")
    await index.record(B, CHAIN[:2], "predicted")
    await index.clear(A)
    await index.clear(WorkerId("nobody"))
    assert await index.lookup(CHAIN) == {B: 2}
    assert await index.lookup((21, 22)) == {}
    assert index.stats() == {B: 2}
    await index.clear(B)
    assert await index.lookup(CHAIN) == {}
    assert index.stats() == {}
    await index.record(A, (21,), "confirmed")
    assert await index.lookup((21, 22)) == {A: 1}


async def test_stats_count_distinct_blocks_per_worker(make_index: MakeIndex) -> None:
    """stats reports how many distinct blocks each worker holds, shared blocks counted once."""
    index = await make_index()
    await index.record(A, (1, 2, 3), "confirmed")
    await index.record(A, (1, 2, 4), "predicted")
    await index.record(B, (9,), "confirmed")
    assert index.stats() == {A: 4, B: 1}


async def test_tenants_with_identical_text_never_share_warm_blocks(make_index: MakeIndex) -> None:
    """Two tenants sending the same prompt get disjoint chains, so one's cache never leaks."""
    hasher = ApproxHasher(block_chars=64)
    text = "You are a helpful assistant. Answer briefly and cite sources. " * 40
    acme = hasher.chain(scope_key("acme", "m"), text)
    globex = hasher.chain(scope_key("globex", "m"), text)
    assert len(acme) == len(globex) > 30
    assert not set(acme) & set(globex)
    index = await make_index()
    await index.record(A, acme, "confirmed")
    assert await index.lookup(globex) == {}
    await index.record(B, globex, "predicted")
    assert await index.lookup(acme) == {A: len(acme)}
    assert await index.lookup(globex) == {B: len(globex)}


async def test_long_chains_are_handled_whole(make_index: MakeIndex) -> None:
    """A prompt of thousands of blocks is recorded, looked up and evicted like a short one."""
    index = await make_index(capacity=2500)
    chain = tuple(range(10_000, 13_000))
    await index.record(A, chain, "predicted")
    await index.record(B, chain[:1200], "confirmed")
    assert await index.lookup(chain) == {A: 2500, B: 1200}
    await index.remove(A, chain[2000:])
    assert await index.lookup(chain) == {A: 2000, B: 1200}
    assert index.stats() == {A: 2000, B: 1200}
