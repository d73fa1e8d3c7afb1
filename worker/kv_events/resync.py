"""What the sidecar decides, without I/O: sequence numbers, and operations waiting for Redis.

`SequenceTracker` classifies each batch number of one publisher. The next one is applied. A
jump is a gap: the missing batches are fetched by replay if possible, else the worker's entries
are cleared. A number at or below the last one, or any jump after the publisher's connection
dropped, is a restart: the worker's cache is new, so its entries are cleared and the new
publisher's history is replayed from 0 when possible. The first batch the sidecar sees is
handled like a restart (entries left from before are not trusted). Clearing loses only hints:
afterwards the index holds a subset of what the worker holds, never a block it does not.

`batch_ops` turns events into index operations; `PendingOps` holds them while Redis is away.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from worker.kv_events.wire import Cleared, Event, Stored

GPU_MEDIA = frozenset({None, "GPU"})
"""Tiers applied: vLLM's GPU prefix cache (what ``cached_tokens`` reports); null = unknown."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a batch's sequence number means, and what to do before applying the batch."""

    kind: Literal["next", "gap", "restart", "start"]
    clear_first: bool
    """Forget the worker's entries first (a new publisher, or one not trusted)."""
    missing: range
    """Batches to fetch by replay before this one (empty: none)."""


class SequenceTracker:
    """Classifies sequence numbers of one publisher's batches (see the module docstring)."""

    def __init__(self) -> None:
        self.last: int | None = None
        self._peer_lost = False

    def peer_lost(self) -> None:
        """The publisher's connection dropped: it may come back as a new process."""
        self._peer_lost = True

    def check(self, seq: int) -> Verdict:
        last = self.last
        if last is None:
            return Verdict("start", True, range(seq))
        if seq == last + 1:
            return Verdict("next", False, range(0))
        if seq <= last or self._peer_lost:
            return Verdict("restart", True, range(seq))
        return Verdict("gap", False, range(last + 1, seq))

    def advance(self, seq: int) -> None:
        """``seq`` has been applied."""
        self.last = seq
        self._peer_lost = False


@dataclass(frozen=True, slots=True)
class IndexOp:
    kind: Literal["record", "remove", "clear"]
    hashes: tuple[int, ...] = ()
    events: int = 1
    """KV events this operation applies (0 for a clear the sidecar decided on)."""


def batch_ops(events: Sequence[Event]) -> tuple[list[IndexOp], int]:
    """Index operations for a batch's GPU-tier events (consecutive removals merged), and the
    number of events of other tiers skipped."""
    ops: list[IndexOp] = []
    skipped = 0
    for event in events:
        if isinstance(event, Cleared):
            ops.append(IndexOp("clear"))
        elif event.medium not in GPU_MEDIA:
            skipped += 1
        elif isinstance(event, Stored):
            ops.append(IndexOp("record", event.hashes))
        elif ops and ops[-1].kind == "remove":
            last = ops[-1]
            ops[-1] = IndexOp("remove", last.hashes + event.hashes, last.events + 1)
        else:
            ops.append(IndexOp("remove", event.hashes))
    return ops, skipped


class PendingOps:
    """FIFO of operations waiting for Redis, at most ``limit`` long.

    A clear supersedes what waits before it. On overflow everything waiting is dropped and
    replaced by a clear, so a lost removal can never leave a stale entry behind. `take` and
    `retry` let an operation that failed go back to the front, unless a clear came meanwhile.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._ops: deque[IndexOp] = deque()
        self._epoch = 0

    def __len__(self) -> int:
        return len(self._ops)

    def push(self, op: IndexOp) -> int:
        """Queue ``op``; the number of events dropped to make room (0 mostly)."""
        dropped = 0
        if op.kind == "clear":
            self._reset()
        elif len(self._ops) >= self.limit:
            dropped = sum(o.events for o in self._ops)
            self._reset()
            self._ops.append(IndexOp("clear", events=0))
        self._ops.append(op)
        return dropped

    def take(self) -> tuple[IndexOp, int] | None:
        """The oldest operation and a token for `retry`, or None if nothing waits."""
        if not self._ops:
            return None
        return self._ops.popleft(), self._epoch

    def retry(self, op: IndexOp, token: int) -> None:
        """Put a failed ``op`` back in front, unless a clear superseded it since `take`."""
        if token == self._epoch:
            self._ops.appendleft(op)

    def _reset(self) -> None:
        self._ops.clear()
        self._epoch += 1
