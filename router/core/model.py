"""Value types shared by the pure routing core.

Everything here is a frozen dataclass or a Protocol: the policies are pure functions of
(`RouteRequest`, `ClusterView`) and return a `Decision`; the server turns a decision into a
forwarded request, metrics and spans. Nothing in `router/core/` performs I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NewType, Protocol

if TYPE_CHECKING:
    from router.core.ring import HashRing

WorkerId = NewType("WorkerId", str)
"""Stable name of a worker (the `id` in config, or its URL when no id is given)."""

BlockHash = int
"""A 64-bit unsigned chained block hash."""

Reason = Literal["warm", "affinity", "spill", "fallback"]
"""Why a worker was chosen.

- ``warm``: the chosen worker holds the longest warm prefix found anywhere.
- ``affinity``: no usable warm match; the chosen worker owns the affinity key on the ring.
- ``spill``: the preferred worker (best warm match, or the ring owner) was at its bounded-load
  cap, so the request went to the next candidate.
- ``fallback``: nothing to be affine to (prompt shorter than a block, or a load-only policy).
"""

PolicyName = Literal["round_robin", "least_loaded", "consistent_hash", "cache_aware"]


@dataclass(frozen=True, slots=True)
class Tuning:
    """The live-tunable thresholds (admin API ``PUT /admin/config``)."""

    load_factor: float = 1.25
    """Bounded-load factor c >= 1: no worker takes more than ceil(c * (total + 1) / n)."""
    min_match_blocks: int = 2
    """A warm match shorter than this many blocks is ignored (routes by affinity instead)."""
    min_match_ratio: float = 0.0
    """A warm match covering less than this fraction of the request's blocks is ignored."""
    affinity_blocks: int = 8
    """The affinity key is the chain hash at depth min(n_blocks, affinity_blocks)."""
    affinity_choices: int = 2
    """cache_aware: a prefix warm nowhere goes to the least loaded of the first this many
    workers under the cap on its ring walk (1: the first, classic consistent hashing)."""
    load_floor: int = 4
    """The cap is never below this: a worker with fewer requests in flight is never too busy
    for a request whose prefix is warm or affine there (0: the bounded-load formula alone)."""

    def __post_init__(self) -> None:
        if not self.load_factor >= 1.0:
            raise ValueError(f"load_factor must be >= 1.0, got {self.load_factor}")
        if self.min_match_blocks < 1:
            raise ValueError(f"min_match_blocks must be >= 1, got {self.min_match_blocks}")
        if not 0.0 <= self.min_match_ratio <= 1.0:
            raise ValueError(f"min_match_ratio must be in [0, 1], got {self.min_match_ratio}")
        if self.affinity_blocks < 1:
            raise ValueError(f"affinity_blocks must be >= 1, got {self.affinity_blocks}")
        if self.affinity_choices < 1:
            raise ValueError(f"affinity_choices must be >= 1, got {self.affinity_choices}")
        if self.load_floor < 0:
            raise ValueError(f"load_floor must be >= 0, got {self.load_floor}")


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What a policy needs to know about one request, already hashed."""

    chain: tuple[BlockHash, ...]
    """Chained block hashes of the rendered prompt, full blocks only, tenant-scoped."""
    affinity_key: BlockHash | None
    """Key for the ring: chain head at `affinity_blocks`, or the hashed ``prompt_cache_key``.
    None when the prompt has no full block and no cache key."""
    tenant: str = "default"
    prompt_units: int = 0
    """Size of the rendered prompt (characters or tokens, by hasher); informational."""


@dataclass(frozen=True, slots=True)
class WorkerView:
    """One routable worker as the policy sees it."""

    id: WorkerId
    load: int
    """In-flight requests on this worker (summed over router replicas when shared)."""
    warm_depth: int = 0
    """How many leading blocks of this request's chain are warm on this worker."""


@dataclass(frozen=True, slots=True)
class ClusterView:
    """The healthy workers (only those) at decision time, with their loads and warm depths.

    ``ring`` is built over every *member* (healthy or not); policies walk it and skip workers
    that are not in ``workers``, so a health flap never reshuffles other keys.
    """

    workers: tuple[WorkerView, ...]
    ring: HashRing
    tuning: Tuning = field(default_factory=Tuning)
    ids: frozenset[WorkerId] = field(init=False, repr=False, compare=False)
    """The ids of ``workers``, for ring walks that skip the others (computed once)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", frozenset(w.id for w in self.workers))

    @classmethod
    def with_ids(
        cls,
        workers: tuple[WorkerView, ...],
        ring: HashRing,
        tuning: Tuning,
        ids: frozenset[WorkerId],
    ) -> ClusterView:
        """A view whose ``ids`` the caller already holds (they must be those of ``workers``):
        a caller whose healthy set rarely changes skips rebuilding it per request."""
        view = object.__new__(cls)
        for name, value in (("workers", workers), ("ring", ring), ("tuning", tuning)):
            object.__setattr__(view, name, value)
        object.__setattr__(view, "ids", ids)
        return view

    def by_id(self) -> dict[WorkerId, WorkerView]:
        return {w.id: w for w in self.workers}

    @property
    def total_load(self) -> int:
        return sum(w.load for w in self.workers)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a policy, with enough context to explain it (``POST /admin/route``)."""

    worker: WorkerId
    reason: Reason
    matched_blocks: int
    """Warm blocks of the chain on the chosen worker."""
    best_available_blocks: int
    """Longest warm match on any healthy worker (what a perfect choice would capture)."""
    affinity_worker: WorkerId | None
    """Owner of the affinity key on the ring, before any load bound (None without a key)."""
    cap: int | None = None
    """Bounded-load cap in force for this decision (None for unbounded policies)."""
    total_blocks: int = 0
    """Number of full blocks in the request's chain."""


class Policy(Protocol):
    """Chooses one worker for a request. Pure: no I/O; may keep in-memory state (a counter)."""

    name: PolicyName

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        """Pick a worker from ``view.workers`` (never empty; callers check first)."""
        ...


class Hasher(Protocol):
    """Turns a rendered prompt into a tenant-scoped block chain."""

    def chain(self, scope: str, prompt: str | Sequence[int]) -> tuple[BlockHash, ...]:
        """Chained hashes of the full blocks of ``prompt``, rooted in ``scope``."""
        ...

    def units(self, prompt: str | Sequence[int]) -> int:
        """Size of ``prompt`` in this hasher's units (characters or tokens)."""
        ...

    @property
    def block_units(self) -> int:
        """Units (characters or tokens) per block."""
        ...


WarmDepths = Mapping[WorkerId, int]
