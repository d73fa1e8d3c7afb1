"""The embedded warm index: per-worker LRU of block hashes, in this process only.

Layout: one ``OrderedDict`` per worker, ``block -> expiry``, least recently recorded first and
bounded by ``capacity_blocks`` (mirror the worker's KV cache size). A lookup probes each
worker's dict for the head of the chain, then scans the workers that hold it until their runs
end. There is no shared ``block -> workers`` map: a second structure to keep in step cost more
on every record (the hot path: every request records its chain twice, predicted then
confirmed) than probing a handful of workers costs on a lookup.

Why ``OrderedDict`` rather than a plain dict in insertion order (which the garbage collector
would not track): evicting a plain dict's first key is O(number of deleted entries before it)
in CPython, so at the default 100 000 blocks a steady stream of evictions costs hundreds of
microseconds per request; ``popitem(last=False)`` and ``move_to_end`` are O(1). The values are
floats and the keys ints, so the collector's walk over these dicts is cheap, and the CLI raises
the collector's thresholds so full collections are rare.

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
        self._lru: dict[WorkerId, OrderedDict[BlockHash, float]] = {}

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
        depths: dict[WorkerId, int] = {}
        if not chain:
            return depths
        now = self._clock()
        head = chain[0]
        rest = chain[1:]
        for worker, lru in self._lru.items():
            get = lru.get
            if get(head, 0.0) <= now:
                continue
            depth = 1
            for block in rest:
                if get(block, 0.0) <= now:
                    break
                depth += 1
            depths[worker] = depth
        return depths

    async def record(self, worker: WorkerId, chain: Sequence[BlockHash], source: Source) -> None:
        self.record_sync(worker, chain, source)

    def record_sync(self, worker: WorkerId, chain: Sequence[BlockHash], source: Source) -> None:
        lru = self._lru.get(worker)
        if lru is None:
            lru = self._lru[worker] = OrderedDict()
        expiry = _CONFIRMED if source == "confirmed" else self._clock() + self._ttl
        get, move_to_end = lru.get, lru.move_to_end
        for block in reversed(chain):
            held = get(block)
            if held is None:
                lru[block] = expiry
            else:
                if held < expiry:
                    lru[block] = expiry
                move_to_end(block)
        excess = len(lru) - self._worker_capacity.get(worker, self._capacity)
        if excess > 0:
            evict = lru.popitem
            for _ in range(excess):
                evict(last=False)

    async def remove(self, worker: WorkerId, hashes: Iterable[BlockHash]) -> None:
        lru = self._lru.get(worker)
        if lru is None:
            return
        for block in hashes:
            lru.pop(block, None)

    async def clear(self, worker: WorkerId) -> None:
        self._lru.pop(worker, None)

    def stats(self) -> dict[WorkerId, int]:
        return {worker: len(lru) for worker, lru in self._lru.items()}
