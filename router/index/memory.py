"""The embedded warm index: per-worker LRU of block hashes, in this process only.

Layout: ``holders[hash] -> {worker: expiry}`` answers "who has this block" in one dict lookup,
so a lookup walks the chain once and intersects the holder sets as it goes, stopping at the
first block nobody holds. ``lru[worker]`` orders that worker's blocks for eviction, bounded by
``capacity_blocks`` (mirror the worker's KV cache size).

A chain is recorded tail first, so its head ends up most recent and the tail is evicted first:
vLLM frees a finished request's blocks in that order too, and a chain without its head is
worth nothing. Predicted entries expire after ``predicted_ttl_s`` unless a response confirms
them; confirmed entries never expire and leave only by LRU, `remove` or `clear`.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from router.core.model import BlockHash, WorkerId
from router.index import Source

_CONFIRMED = math.inf


class MemoryWarmIndex:
    def __init__(
        self,
        capacity_blocks: int,
        predicted_ttl_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity_blocks < 1:
            raise ValueError("capacity_blocks must be >= 1")
        self._capacity = capacity_blocks
        self._worker_capacity: dict[WorkerId, int] = {}
        self._ttl = predicted_ttl_s
        self._clock = clock
        self._holders: dict[BlockHash, dict[WorkerId, float]] = {}
        self._lru: dict[WorkerId, OrderedDict[BlockHash, None]] = {}

    async def start(self) -> None:
        return None

    @property
    def available(self) -> bool:
        return True

    def set_capacity(self, worker: WorkerId, blocks: int) -> None:
        self._worker_capacity[worker] = max(1, min(blocks, self._capacity))

    async def close(self) -> None:
        return None

    async def lookup(self, chain: Sequence[BlockHash]) -> dict[WorkerId, int]:
        return self.lookup_sync(chain)

    def lookup_sync(self, chain: Sequence[BlockHash]) -> dict[WorkerId, int]:
        if not chain:
            return {}
        now = self._clock()
        holders_of = self._holders
        first = holders_of.get(chain[0])
        if not first:
            return {}
        alive = [w for w, expiry in first.items() if expiry > now]
        depths = dict.fromkeys(alive, 1)
        depth = 1
        # Several workers share the head: narrow the set block by block until one is left.
        while len(alive) > 1 and depth < len(chain):
            holders = holders_of.get(chain[depth])
            if not holders:
                return depths
            alive = [w for w in alive if holders.get(w, 0.0) > now]
            depth += 1
            for worker in alive:
                depths[worker] = depth
        if len(alive) == 1:
            # One worker left (the common case): a plain scan, one dict probe per block.
            (worker,) = alive
            for block in chain[depth:]:
                holders = holders_of.get(block)
                if holders is None or holders.get(worker, 0.0) <= now:
                    break
                depth += 1
            depths[worker] = depth
        return depths

    async def record(self, worker: WorkerId, chain: Sequence[BlockHash], source: Source) -> None:
        self.record_sync(worker, chain, source)

    def record_sync(self, worker: WorkerId, chain: Sequence[BlockHash], source: Source) -> None:
        expiry = _CONFIRMED if source == "confirmed" else self._clock() + self._ttl
        lru = self._lru.setdefault(worker, OrderedDict())
        holders_of = self._holders
        for block in reversed(chain):
            holders = holders_of.get(block)
            if holders is None:
                holders_of[block] = {worker: expiry}
            elif holders.get(worker, 0.0) < expiry:
                holders[worker] = expiry
            if block in lru:
                lru.move_to_end(block)
            else:
                lru[block] = None
        capacity = self._worker_capacity.get(worker, self._capacity)
        while len(lru) > capacity:
            evicted, _ = lru.popitem(last=False)
            self._drop(worker, evicted)

    async def remove(self, worker: WorkerId, hashes: Iterable[BlockHash]) -> None:
        lru = self._lru.get(worker)
        if lru is None:
            return
        for block in hashes:
            if block in lru:
                del lru[block]
                self._drop(worker, block)

    async def clear(self, worker: WorkerId) -> None:
        lru = self._lru.pop(worker, None)
        if lru is None:
            return
        for block in lru:
            self._drop(worker, block)

    def stats(self) -> dict[WorkerId, int]:
        return {worker: len(lru) for worker, lru in self._lru.items()}

    def _drop(self, worker: WorkerId, block: BlockHash) -> None:
        holders = self._holders.get(block)
        if holders is not None:
            holders.pop(worker, None)
            if not holders:
                del self._holders[block]
