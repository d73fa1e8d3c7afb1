"""The simulator's prefix cache and block hashes behave like vLLM v1's."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.sim.cache import (
    AllBlocksCleared,
    Allocation,
    BlockRemoved,
    BlockStored,
    CacheEvent,
    PrefixCache,
)
from worker.sim.hashing import BlockHasher, low64

BS = 4


def make_cache(num_blocks: int, events: list[CacheEvent] | None = None) -> PrefixCache:
    listeners = [events.append] if events is not None else []
    return PrefixCache(num_blocks, BlockHasher(BS, "seed"), listeners)


def admit(
    cache: PrefixCache, tokens: list[int], salt: str | None = None, max_new: int = 1
) -> Allocation | None:
    return cache.admit(tokens, cache.hasher.chain(tokens, salt), salt, max_new)


def seq(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


# ---- hashing ------------------------------------------------------------------------------


def test_only_full_blocks_are_hashed() -> None:
    """A prompt of 2 blocks and 3 tokens has exactly 2 block hashes."""
    hasher = BlockHasher(BS, "seed")
    assert len(hasher.chain(seq(0, 2 * BS + 3))) == 2


@settings(deadline=None)
@given(st.lists(st.integers(0, 2**32), min_size=3 * BS, max_size=6 * BS), st.data())
def test_a_change_in_block_k_changes_every_hash_from_k_on(
    tokens: list[int], data: st.DataObject
) -> None:
    """Editing one token in block k changes block k's hash and all later ones, none before."""
    hasher = BlockHasher(BS, "seed")
    position = data.draw(st.integers(0, len(tokens) // BS * BS - 1))
    changed = list(tokens)
    changed[position] += 1
    before, after = hasher.chain(tokens), hasher.chain(changed)
    k = position // BS
    assert before[:k] == after[:k]
    assert all(b != a for b, a in zip(before[k:], after[k:], strict=True))


def test_hashes_are_deterministic_and_seeded() -> None:
    """The same seed gives the same chain in any process; another seed gives another chain."""
    tokens = seq(0, 3 * BS)
    assert BlockHasher(BS, "a").chain(tokens) == BlockHasher(BS, "a").chain(tokens)
    assert set(BlockHasher(BS, "a").chain(tokens)).isdisjoint(BlockHasher(BS, "b").chain(tokens))


def test_salt_changes_every_block_hash() -> None:
    """Salted chains share no hash with unsalted ones or with other salts."""
    hasher = BlockHasher(BS, "seed")
    tokens = seq(0, 4 * BS)
    plain, a, b = hasher.chain(tokens), hasher.chain(tokens, "a"), hasher.chain(tokens, "b")
    assert set(plain).isdisjoint(a)
    assert set(a).isdisjoint(b)
    assert hasher.chain(tokens, "") == plain  # an empty salt is no salt, as in vLLM


def test_low64_takes_the_low_bits_of_the_big_endian_digest() -> None:
    """KV events carry the digest's low 64 bits."""
    digest = bytes(range(32))
    assert low64(digest) == int.from_bytes(bytes(range(24, 32)), "big")


# ---- hits ---------------------------------------------------------------------------------


def test_second_request_with_same_prefix_hits_its_full_blocks() -> None:
    """After a request stored 3 blocks, another with the same start and more tokens hits them."""
    cache = make_cache(32)
    first = admit(cache, seq(0, 3 * BS + 1))
    assert first is not None
    assert first.hit_tokens == 0
    cache.release(first)
    second = admit(cache, seq(0, 3 * BS + 1) + [999] * 6)
    assert second is not None
    assert second.hit_tokens == 3 * BS


def test_hit_is_capped_so_the_last_prompt_token_is_recomputed() -> None:
    """A prompt of exactly 3 cached blocks hits only 2; one more token lets it hit all 3."""
    cache = make_cache(32)
    tokens = seq(0, 3 * BS)
    warm = admit(cache, [*tokens, 7])
    assert warm is not None
    cache.release(warm)
    exact = admit(cache, tokens)
    assert exact is not None
    assert exact.hit_tokens == 2 * BS
    cache.release(exact)
    plus_one = admit(cache, [*tokens, 8])
    assert plus_one is not None
    assert plus_one.hit_tokens == 3 * BS


def test_hit_stops_at_the_first_missing_block() -> None:
    """A prompt whose second block differs hits only the first block."""
    cache = make_cache(32)
    warm = admit(cache, seq(0, 4 * BS))
    assert warm is not None
    cache.release(warm)
    tokens = seq(0, 4 * BS)
    tokens[BS] = -1
    probe = admit(cache, tokens)
    assert probe is not None
    assert probe.hit_tokens == BS


def test_salted_requests_never_share_blocks_with_other_salts() -> None:
    """The same text under salt a is not a hit for salt b nor for no salt; salt a hits itself."""
    cache = make_cache(64)
    tokens = seq(0, 4 * BS + 1)
    first = admit(cache, tokens, salt="a")
    assert first is not None
    cache.release(first)
    for salt in ("b", None):
        other = admit(cache, tokens, salt=salt)
        assert other is not None
        assert other.hit_tokens == 0
        cache.release(other)
    again = admit(cache, tokens, salt="a")
    assert again is not None
    assert again.hit_tokens == 4 * BS


# ---- eviction -----------------------------------------------------------------------------


def test_freed_blocks_are_evicted_least_recently_used_first_tail_first() -> None:
    """Blocks of the request freed first are reused first, its deepest block before its first."""
    cache = make_cache(4)
    a = admit(cache, seq(0, 2 * BS))
    b = admit(cache, seq(100, 2 * BS))
    assert a is not None
    assert b is not None
    a_ids = [blk.block_id for blk in a.blocks]
    b_ids = [blk.block_id for blk in b.blocks]
    cache.release(a)
    cache.release(b)
    assert cache.free_block_ids() == a_ids[::-1] + b_ids[::-1]
    # One new block evicts a's tail block; a's head block stays hittable.
    c = admit(cache, seq(200, BS - 1))
    assert c is not None
    assert [blk.block_id for blk in c.blocks] == [a_ids[1]]
    a_hashes = cache.hasher.chain(seq(0, 2 * BS))
    assert cache.is_cached(a_hashes[0])
    assert not cache.is_cached(a_hashes[1])


def test_free_cached_blocks_stay_hittable_until_space_is_needed() -> None:
    """A finished request's blocks are still hits while nothing else needs them."""
    cache = make_cache(8)
    first = admit(cache, seq(0, 4 * BS))
    assert first is not None
    cache.release(first)
    assert cache.num_used == 0
    assert cache.num_cached == 4
    second = admit(cache, [*seq(0, 4 * BS), 1])
    assert second is not None
    assert second.hit_tokens == 4 * BS
    # Hit blocks left the free queue: they are referenced again.
    assert cache.num_used == 5


def test_blocks_of_running_requests_are_never_evicted() -> None:
    """When only a running request's blocks could make room, admission fails instead."""
    cache = make_cache(4)
    running = admit(cache, seq(0, 3 * BS))
    assert running is not None
    assert admit(cache, seq(100, 2 * BS)) is None
    for block_hash in cache.hasher.chain(seq(0, 3 * BS)):
        assert cache.is_cached(block_hash)
    assert all(blk.block_id not in cache.free_block_ids() for blk in running.blocks)


def test_a_request_waits_when_full_and_fits_once_blocks_are_freed() -> None:
    """Admission returns None while the cache is full and succeeds after a release."""
    cache = make_cache(4)
    holder = admit(cache, seq(0, 4 * BS))
    assert holder is not None
    assert admit(cache, seq(50, BS)) is None
    cache.release(holder)
    assert admit(cache, seq(50, BS)) is not None


def test_admission_reserves_blocks_for_the_completion() -> None:
    """A request that will generate 2 blocks of tokens keeps them from other requests."""
    cache = make_cache(4)
    long_gen = admit(cache, seq(0, BS), max_new=2 * BS + 1)
    assert long_gen is not None
    assert cache.num_used == 1
    assert cache.num_reserved == 2
    assert admit(cache, seq(100, 2 * BS)) is None
    assert admit(cache, seq(100, BS)) is not None


def test_generated_tokens_fill_blocks_that_become_hittable() -> None:
    """Blocks completed by decode are registered like prompt blocks and use the reservation."""
    events: list[CacheEvent] = []
    cache = make_cache(8, events)
    prompt = seq(0, BS + 2)
    alloc = admit(cache, prompt, max_new=BS + 1)
    assert alloc is not None
    assert alloc.reserved == 1
    cache.grow(alloc, [500, 501])
    assert alloc.reserved == 1
    assert len(alloc.blocks) == 2
    assert alloc.num_cached_blocks == 2
    cache.grow(alloc, [502])
    assert alloc.reserved == 0
    assert len(alloc.blocks) == 3
    full = [*prompt, 500, 501, 502]
    second_hash = cache.hasher.chain(full)[1]
    assert cache.is_cached(second_hash)
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert stored[-1].block_hashes == (second_hash,)
    assert stored[-1].token_ids == tuple(full[BS : 2 * BS])


def test_cache_events_report_stored_removed_and_cleared_hashes() -> None:
    """Listeners see BlockStored on admit, BlockRemoved on eviction, AllBlocksCleared on reset."""
    events: list[CacheEvent] = []
    cache = make_cache(2, events)
    tokens = seq(0, 2 * BS)
    hashes = cache.hasher.chain(tokens)
    first = admit(cache, tokens)
    assert first is not None
    assert events == [BlockStored(tuple(hashes), None, tuple(tokens), BS)]
    cache.release(first)
    second = admit(cache, seq(100, BS))
    assert second is not None
    assert BlockRemoved((hashes[1],)) in events
    cache.reset()
    assert isinstance(events[-1], AllBlocksCleared)
    assert cache.num_cached == 0


def test_usage_is_the_fraction_of_blocks_out_of_the_free_queue() -> None:
    """kv_cache_usage_perc counts referenced blocks only, not free cached ones."""
    cache = make_cache(8)
    alloc = admit(cache, seq(0, 2 * BS))
    assert alloc is not None
    assert cache.usage == 2 / 8
    cache.release(alloc)
    assert cache.usage == 0.0
    assert cache.num_cached == 2


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 5 * BS), st.integers(1, 2 * BS)),
        max_size=40,
    )
)
def test_pool_invariants_hold_under_any_sequence(ops: list[tuple[int, int, int]]) -> None:
    """Free + used = total, referenced blocks are never free, reservations fit in the free queue."""
    cache = make_cache(12)
    live: list[Allocation] = []
    for op, length, gen in ops:
        if op <= 1:
            alloc = admit(cache, seq(op * 1000, length), max_new=gen)
            if alloc is not None:
                live.append(alloc)
        elif op == 2 and live:
            cache.release(live.pop(0))
        elif live:
            alloc = live[-1]
            room = alloc.reserved * BS
            cache.grow(alloc, [7] * min(room, 3))
        free = set(cache.free_block_ids())
        assert cache.num_free + cache.num_used == cache.num_blocks
        assert cache.num_reserved <= cache.num_free
        for alloc in live:
            assert all(blk.ref_cnt > 0 and blk.block_id not in free for blk in alloc.blocks)
