"""The Redis warm index against a real redis-server: shared by replicas, agrees with the memory
index on random histories, fails open within its deadline, backs off, and recovers by itself
from a restart (scripts flushed), a hang and a Redis that was down at start."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from load_tests.redis_server import RedisServer
from router.core.blocks import ApproxHasher, scope_key
from router.core.model import BlockHash, WorkerId
from router.errors import IndexUnavailable
from router.index.memory import MemoryWarmIndex
from router.index.redis import RedisWarmIndex

A, B = WorkerId("a"), WorkerId("b")
CHAIN = tuple(range(1000, 1040))
OP_TIMEOUT = 0.25
FAST = 0.02
"""A call that fails fast must take far less than OP_TIMEOUT (it touches no network)."""


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


Factory = Callable[..., Awaitable[RedisWarmIndex]]


@pytest.fixture
async def make_index(redis_server: RedisServer) -> AsyncIterator[Factory]:
    opened: list[RedisWarmIndex] = []

    async def make(*, start: bool = True, **options: object) -> RedisWarmIndex:
        settings: dict[str, object] = {
            "capacity_blocks": 10_000,
            "predicted_ttl_s": 60.0,
            "op_timeout_s": OP_TIMEOUT,
            "backoff_base_s": 0.05,
            "backoff_max_s": 0.2,
            **options,
        }
        index = RedisWarmIndex(redis_server.url, **settings)  # type: ignore[arg-type]
        if start:
            await index.start()
        opened.append(index)
        return index

    yield make
    for index in opened:
        await index.close()


async def until_available(index: RedisWarmIndex, within: float = 10.0) -> None:
    """Poll with real calls until the index answers again (fails the test after ``within``)."""
    deadline = time.monotonic() + within
    while True:
        try:
            await index.lookup(CHAIN)
            return
        except IndexUnavailable:
            if time.monotonic() > deadline:
                raise AssertionError(f"index did not recover within {within}s") from None
            await asyncio.sleep(0.02)


async def timed(call: Awaitable[object]) -> tuple[float, BaseException | None]:
    started = time.perf_counter()
    try:
        await call
    except Exception as exc:
        return time.perf_counter() - started, exc
    return time.perf_counter() - started, None


async def test_replicas_share_one_index(make_index: Factory) -> None:
    """A chain one replica recorded is warm for another replica at once."""
    first, second = await make_index(), await make_index()
    await first.record(A, CHAIN, "confirmed")
    await second.record(B, CHAIN[:7], "predicted")
    assert await second.lookup(CHAIN) == {A: 40, B: 7}
    assert await first.lookup(CHAIN) == {A: 40, B: 7}
    assert await second.refresh_stats() == {A: 40, B: 7}


async def test_deployments_with_different_prefixes_do_not_see_each_other(
    make_index: Factory,
) -> None:
    """Two deployments sharing one Redis under different prefixes keep separate indexes."""
    blue, green = await make_index(prefix="blue"), await make_index(prefix="green")
    await blue.record(A, CHAIN, "confirmed")
    assert await green.lookup(CHAIN) == {}
    assert await green.refresh_stats() == {}
    await green.clear(A)
    assert await blue.lookup(CHAIN) == {A: 40}


async def test_agrees_with_the_memory_index_on_a_random_history(make_index: Factory) -> None:
    """Over a random mix of records, removals, clears and expiry, both indexes answer alike."""
    rng = random.Random(20240611)
    clock = FakeClock()
    capacity, ttl = 120, 30.0
    shared = await make_index(capacity_blocks=capacity, predicted_ttl_s=ttl, clock=clock)
    embedded = MemoryWarmIndex(capacity, ttl, clock=clock)
    hasher = ApproxHasher(block_chars=8)
    workers = [WorkerId(f"w{i}") for i in range(5)]
    heads = [f"system prompt of tenant {t}; tools: search, fetch. " for t in range(4)]
    chains: list[tuple[BlockHash, ...]] = []
    for step in range(300):
        tenant = rng.randrange(len(heads))
        text = heads[tenant] + " ".join(str(rng.randrange(3)) for _ in range(rng.randrange(40)))
        chain = hasher.chain(scope_key(f"t{tenant}", "m"), text)
        chains.append(chain)
        op = rng.random()
        worker = rng.choice(workers)
        if op < 0.65:
            source = rng.choice(("predicted", "confirmed"))
            await shared.record(worker, chain, source)  # type: ignore[arg-type]
            await embedded.record(worker, chain, source)  # type: ignore[arg-type]
        elif op < 0.9:
            cut = rng.randrange(len(chain) + 1)
            await shared.remove(worker, chain[cut:])
            await embedded.remove(worker, chain[cut:])
        elif op < 0.95:
            await shared.clear(worker)
            await embedded.clear(worker)
        else:
            clock.now += rng.uniform(0, ttl)
        if step % 10 == 9:
            for probe in rng.sample(chains, min(15, len(chains))):
                assert await shared.lookup(probe) == await embedded.lookup(probe), step
            assert shared.stats() == embedded.stats(), step
            assert await shared.refresh_stats() == embedded.stats(), step


async def test_a_stopped_redis_fails_within_the_deadline_then_fast(
    make_index: Factory, redis_server: RedisServer
) -> None:
    """With Redis gone, the first call fails within op_timeout and later ones fail at once."""
    index = await make_index(backoff_base_s=5.0, backoff_max_s=10.0)
    await index.record(A, CHAIN, "confirmed")
    redis_server.stop()
    elapsed, error = await timed(index.lookup(CHAIN))
    assert isinstance(error, IndexUnavailable)
    assert elapsed < OP_TIMEOUT + 0.1
    assert not index.available
    for call in (
        index.lookup(CHAIN),
        index.record(A, CHAIN, "predicted"),
        index.remove(A, CHAIN),
        index.clear(A),
        index.refresh_stats(),
    ):
        elapsed, error = await timed(call)
        assert isinstance(error, IndexUnavailable)
        assert elapsed < FAST


async def test_a_restarted_redis_is_used_again_with_its_scripts_reloaded(
    make_index: Factory, redis_server: RedisServer
) -> None:
    """After a Redis restart (keys and scripts gone) the index comes back by itself, empty."""
    index = await make_index()
    await index.record(A, CHAIN, "confirmed")
    redis_server.restart()
    await until_available(index)
    assert index.available
    assert await index.lookup(CHAIN) == {}
    await index.record(B, CHAIN, "predicted")
    assert await index.lookup(CHAIN) == {B: 40}


async def test_flushed_scripts_are_reloaded_without_an_error(
    make_index: Factory, redis_server: RedisServer
) -> None:
    """If Redis forgets the scripts (SCRIPT FLUSH), the next call reloads them and succeeds."""
    index = await make_index()
    await index.record(A, CHAIN, "confirmed")
    async with aioredis.Redis.from_url(redis_server.url) as admin:
        await admin.script_flush()
    assert await index.lookup(CHAIN) == {A: 40}
    assert index.available


async def test_a_hung_redis_is_cut_off_at_the_deadline(
    make_index: Factory, redis_server: RedisServer
) -> None:
    """When Redis stops answering, concurrent calls each give up after op_timeout, and the
    index recovers once Redis answers again."""
    index = await make_index()
    await index.record(A, CHAIN, "confirmed")
    async with aioredis.Redis.from_url(redis_server.url) as admin:
        await admin.execute_command("CLIENT", "PAUSE", "1500", "ALL")
    results = await asyncio.gather(*(timed(index.lookup(CHAIN)) for _ in range(8)))
    for elapsed, error in results:
        assert isinstance(error, IndexUnavailable)
        assert elapsed < OP_TIMEOUT + 0.15
    assert max(elapsed for elapsed, _ in results) > OP_TIMEOUT * 0.8
    await until_available(index)
    assert await index.lookup(CHAIN) == {A: 40}


async def test_a_redis_down_at_start_is_picked_up_later(
    make_index: Factory, redis_server: RedisServer
) -> None:
    """Starting while Redis is down does not fail; the index comes up once Redis does."""
    redis_server.stop()
    index = await make_index()
    assert not index.available
    elapsed, error = await timed(index.lookup(CHAIN))
    assert isinstance(error, IndexUnavailable)
    assert elapsed < FAST
    redis_server.start()
    await until_available(index)
    await index.record(A, CHAIN, "confirmed")
    assert await index.lookup(CHAIN) == {A: 40}


async def test_without_start_the_first_call_after_the_backoff_retries(
    make_index: Factory, redis_server: RedisServer
) -> None:
    """An index nobody started still fails open and recovers through its own calls."""
    index = await make_index(start=False)
    await index.record(A, CHAIN, "confirmed")
    redis_server.restart()
    await until_available(index)
    assert await index.lookup(CHAIN) == {}


async def test_stats_catch_up_with_other_replicas_in_the_background(make_index: Factory) -> None:
    """stats() of a replica that did not write reflects the others' writes within a refresh."""
    writer = await make_index()
    reader = await make_index(stats_interval_s=0.05)
    await writer.record(A, CHAIN, "confirmed")
    deadline = time.monotonic() + 5.0
    while reader.stats() != {A: 40}:
        assert time.monotonic() < deadline, "stats did not refresh"
        await asyncio.sleep(0.02)


async def test_cancelling_a_caller_cancels_its_lookup(make_index: Factory) -> None:
    """A request cancelled during a lookup (client gone, shutdown) stops there, every time."""
    index = await make_index()
    await index.record(A, CHAIN, "confirmed")
    rng = random.Random(5)
    for _ in range(200):
        reached_the_end = False

        async def route() -> None:
            nonlocal reached_the_end
            while True:
                await index.lookup(CHAIN)
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    reached_the_end = True  # the cancel was lost inside the call
                    return

        task = asyncio.create_task(route())
        await asyncio.sleep(rng.random() * 0.002)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not reached_the_end


# Lookups skip ahead through claims on marked blocks (hashes ending in four zero bits): in
# LONG, the blocks 1008, 1024, 1040, ... at 1-based positions 9, 25, 41, ...
LONG = tuple(range(1000, 1300))
MARKS = tuple(i + 1 for i, block in enumerate(LONG) if block % 16 == 0)


@pytest.mark.parametrize("depth", [1, 8, 9, 10, 24, 25, 26, 41, 57, 73, 256, 300])
async def test_depth_is_exact_at_and_around_marks_and_slice_ends(
    make_index: Factory, depth: int
) -> None:
    """A worker holding the first k blocks reports exactly k, wherever k falls."""
    assert MARKS[:3] == (9, 25, 41)
    index = await make_index()
    await index.record(A, LONG[:depth], "confirmed")
    await index.record(B, LONG[:depth], "predicted")
    assert await index.lookup(LONG) == {A: depth, B: depth}
    assert await index.lookup(LONG[:depth]) == {A: depth, B: depth}


async def test_a_chain_held_in_full_reports_every_block(make_index: Factory) -> None:
    """A 4096-token prompt (256 blocks) held in full, confirmed or predicted, matches in full."""
    index = await make_index()
    chain = ApproxHasher(64).chain(scope_key("t", "m"), "x" * 64 * 256)
    await index.record(A, chain, "confirmed")
    await index.record(B, chain, "predicted")
    assert await index.lookup(chain) == {A: 256, B: 256}


async def test_a_gap_in_the_middle_ends_the_match_there(make_index: Factory) -> None:
    """Removing one block mid-chain cuts the match at it, though later blocks are still held."""
    index = await make_index()
    await index.record(A, LONG[:100], "confirmed")
    await index.record(B, LONG[:100], "confirmed")
    await index.remove(A, [LONG[30]])
    await index.remove(B, [LONG[MARKS[0] - 1]])  # a marked block itself
    assert await index.lookup(LONG) == {A: 30, B: MARKS[0] - 1}
    # Recording the chain again fills the gap.
    await index.record(A, LONG[:100], "predicted")
    assert await index.lookup(LONG) == {A: 100, B: MARKS[0] - 1}


async def test_a_head_that_is_gone_means_no_match(make_index: Factory) -> None:
    """A worker that lost the chain's first block matches nothing, whatever else it holds."""
    index = await make_index()
    await index.record(A, LONG[:60], "confirmed")
    await index.remove(A, [LONG[0]])
    assert await index.lookup(LONG) == {}
    assert await index.refresh_stats() == {A: 59}


async def test_expired_predictions_end_the_match_before_confirmed_blocks(
    make_index: Factory,
) -> None:
    """Once a prediction expires, the match stops at its first block, even where a later run
    was confirmed (a KV event storing a continuation)."""
    clock = FakeClock()
    index = await make_index(clock=clock, predicted_ttl_s=30.0)
    await index.record(A, LONG[:5], "confirmed")
    await index.record(A, LONG[:80], "predicted")
    await index.record(A, LONG[30:80], "confirmed")
    assert await index.lookup(LONG) == {A: 80}
    clock.now += 29.0
    assert await index.lookup(LONG) == {A: 80}
    clock.now += 1.0
    assert await index.lookup(LONG) == {A: 5}
    await index.record(A, LONG[:40], "predicted")
    assert await index.lookup(LONG) == {A: 80}


async def test_an_eviction_hole_left_by_a_continuation_ends_the_match(
    make_index: Factory,
) -> None:
    """A continuation recorded after its head (as KV events do) is more recent than the head's
    tail, so LRU evicts that tail first and the match ends at the hole."""
    index = await make_index(capacity_blocks=30)
    await index.record(A, LONG[:20], "confirmed")
    await index.record(A, LONG[20:40], "confirmed")
    assert await index.lookup(LONG) == {A: 10}
    assert await index.refresh_stats() == {A: 30}


async def test_agrees_with_the_memory_index_with_continuations_and_evictions(
    make_index: Factory,
) -> None:
    """Long chains recorded whole or as continuations, partly removed, evicted and expiring:
    both indexes give every worker the same depth."""
    rng = random.Random(77)
    clock = FakeClock()
    capacity, ttl = 150, 30.0
    shared = await make_index(capacity_blocks=capacity, predicted_ttl_s=ttl, clock=clock)
    embedded = MemoryWarmIndex(capacity, ttl, clock=clock)
    hasher = ApproxHasher(block_chars=4)
    workers = [WorkerId(f"w{i}") for i in range(4)]
    heads = ["system prompt one; tools: a, b. " * 3, "another system prompt, longer. " * 4]
    chains: list[tuple[BlockHash, ...]] = []
    for step in range(400):
        tenant = rng.randrange(len(heads))
        text = heads[tenant] + "".join(rng.choice("ab ") for _ in range(rng.randrange(200)))
        chain = hasher.chain(scope_key(f"t{tenant}", "m"), text)
        chains.append(chain)
        worker = rng.choice(workers)
        op = rng.random()
        if op < 0.4:
            source = rng.choice(("predicted", "confirmed"))
            await shared.record(worker, chain, source)  # type: ignore[arg-type]
            await embedded.record(worker, chain, source)  # type: ignore[arg-type]
        elif op < 0.7:
            start = rng.randrange(len(chain))
            stop = rng.randrange(start, len(chain)) + 1
            await shared.record(worker, chain[start:stop], "confirmed")
            await embedded.record(worker, chain[start:stop], "confirmed")
        elif op < 0.85:
            holes = [block for block in chain if rng.random() < 0.05]
            await shared.remove(worker, holes)
            await embedded.remove(worker, holes)
        elif op < 0.88:
            await shared.clear(worker)
            await embedded.clear(worker)
        else:
            clock.now += rng.uniform(0, ttl)
        if step % 10 == 9:
            for probe in rng.sample(chains, min(12, len(chains))):
                assert await shared.lookup(probe) == await embedded.lookup(probe), step
    assert shared.stats() == embedded.stats()


async def test_worker_ids_with_spaces_and_non_ascii_come_back_intact(make_index: Factory) -> None:
    """Worker ids are returned exactly as recorded, whatever characters they hold."""
    index = await make_index()
    odd = [WorkerId("gpu 7 (east)"), WorkerId("wörker-ü 2"), WorkerId("12")]
    for depth, worker in enumerate(odd, start=3):
        await index.record(worker, CHAIN[:depth], "confirmed")
    assert await index.lookup(CHAIN) == {odd[0]: 3, odd[1]: 4, odd[2]: 5}
