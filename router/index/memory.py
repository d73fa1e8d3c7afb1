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
        self._ttl = predicted_ttl_s
        self._clock = clock
        self._holders: dict[BlockHash, dict[WorkerId, float]] = {}
        self._lru: dict[WorkerId, OrderedDict[BlockHash, None]] = {}

    async def lookup(self, chain: Sequence[BlockHash]) -> dict[WorkerId, int]:
        return self.lookup_sync(chain)

    def lookup_sync(self, chain: Sequence[BlockHash]) -> dict[WorkerId, int]:
        now = self._clock()
        depths: dict[WorkerId, int] = {}
        alive: list[WorkerId] | None = None
        holders_of = self._holders
        for depth, block in enumerate(chain, start=1):
            holders = holders_of.get(block)
            if not holders:
                break
            if alive is None:
                alive = [w for w, expiry in holders.items() if expiry > now]
            else:
                alive = [w for w in alive if holders.get(w, 0.0) > now]
            if not alive:
                break
            for worker in alive:
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
        while len(lru) > self._capacity:
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
