"""Warm-prefix indexes: which leading blocks of a chain are warm on which worker.

`WarmIndex` is the seam: the embedded `MemoryWarmIndex` (one replica) and `RedisWarmIndex`
(shared by every replica, also fed by the KV-event sidecar) implement it. Lookups answer
``{worker: depth}``: the number of leading blocks of the chain each worker holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal, Protocol

from router.core.model import BlockHash, WorkerId

Source = Literal["predicted", "confirmed"]
"""``predicted``: the router sent this chain there (expires after a TTL unless confirmed);
``confirmed``: the worker reported it computed or cached it."""


class WarmIndex(Protocol):
    async def start(self) -> None:
        """Open connections and background tasks; must not fail if a backend is down."""
        ...

    async def close(self) -> None:
        """Release everything `start` opened."""
        ...

    async def lookup(self, chain: Sequence[BlockHash]) -> dict[WorkerId, int]:
        """Depth of the warm prefix of ``chain`` on each worker that has at least one block."""
        ...

    async def record(self, worker: WorkerId, chain: Sequence[BlockHash], source: Source) -> None:
        """Mark every block of ``chain`` warm on ``worker``."""
        ...

    async def remove(self, worker: WorkerId, hashes: Iterable[BlockHash]) -> None:
        """Forget these blocks on ``worker`` (evicted, or a predicted hit that missed)."""
        ...

    async def clear(self, worker: WorkerId) -> None:
        """Forget everything about ``worker`` (removed, restarted)."""
        ...

    def set_capacity(self, worker: WorkerId, blocks: int) -> None:
        """Bound ``worker``'s entries to ``blocks`` (at most the configured capacity): set
        from the size of the worker's own KV cache once its ``/metrics`` report it."""
        ...

    @property
    def available(self) -> bool:
        """False while the backend is down (routing then falls back to the ring)."""
        ...

    def stats(self) -> dict[WorkerId, int]:
        """Blocks remembered per worker (for metrics and the admin API)."""
        ...
