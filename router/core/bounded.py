"""Consistent hashing with bounded loads, as a wrapper over any ring (Envoy-style).

Mirrokni, Thorup and Zadimoghaddam (arXiv 1608.01350): with ``n`` eligible workers carrying
``total`` requests in flight, no worker may take a request that would lift it above

    cap = ceil(load_factor * (total + 1) / n)

A request walks the ring from its key and goes to the first eligible worker with
``load + 1 <= cap``. Affinity is a hint, never a pin: a hot key overflows to its next ring
neighbours, in a stable order, so those warm up too instead of the load scattering.

The ring knows nothing of load and this module knows nothing of how the ring is built: it
needs only ``walk(key)``, and takes loads as a mapping so tests inject them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from router.core.model import WorkerId

_FACTOR_SCALE = 1_000_000
"""load_factor is taken in millionths, so the cap is computed in exact integer arithmetic:
in floats 1.1 * 10 / 1 is 11.000000000000002 and its ceiling 12, not 11."""


def load_cap(load_factor: float, total_load: int, n_workers: int, floor: int = 0) -> int:
    """``max(floor, ceil(load_factor * (total_load + 1) / n_workers))``, exact for factors in
    millionths.

    ``floor`` keeps the relative bound from spilling at trivial absolute loads: with four
    workers and one request in flight the formula alone gives a cap of 1, so a second
    request for a warm prefix would leave its warm worker for a cold one although the
    worker is nearly idle (the offline tuner shows this costs 5-15 points of cached-token
    ratio on every scenario, with no gain in balance once loads are real). Raising the cap
    keeps the existence argument in `BoundedLoad.choose`; rounding the factor to millionths
    never takes it below 1 when it was >= 1.
    """
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    factor = round(load_factor * _FACTOR_SCALE)
    numerator = factor * (total_load + 1)
    denominator = _FACTOR_SCALE * n_workers
    return max(floor, -(-numerator // denominator))


class Ring(Protocol):
    """What bounded load needs from a ring: a stable walk of members from a key."""

    def walk(self, key: int) -> Iterator[WorkerId]: ...


@dataclass(frozen=True, slots=True)
class BoundedChoice:
    """Where a key went under bounded load, and why."""

    worker: WorkerId
    spilled: bool
    """True when the owner was at its cap (so ``worker`` is another one)."""
    owner: WorkerId | None
    """First eligible worker on the ring walk from the key (None if no eligible worker is on
    the ring at all)."""
    cap: int


class BoundedLoad:
    """Bounded-load choice over ``ring``; eligibility and loads come with each call."""

    __slots__ = ("ring",)

    def __init__(self, ring: Ring) -> None:
        self.ring = ring

    def choose(
        self,
        key: int,
        loads: Mapping[WorkerId, int],
        load_factor: float,
        floor: int = 0,
        choices: int = 1,
    ) -> BoundedChoice:
        """First worker of ``loads`` on the walk from ``key`` with ``load + 1 <= cap``; with
        ``choices`` = k > 1, the least loaded of the first k such workers (ties: walk order).

        k choices is the "power of k choices" applied to placement along the walk: a key
        still lands on one of a few stable workers, but no longer on one that happens to be
        busier than its neighbours, which keeps placement balanced without spills later.

        Only workers in ``loads`` are candidates (the healthy ones); the cap is computed over
        them. Raises ValueError when ``loads`` is empty.

        A worker under the cap always exists when ``load_factor >= 1``: with ``n`` eligible
        workers and ``total`` in flight, ``cap >= load_factor * (total + 1) / n >=
        (total + 1) / n``. If every worker had ``load >= cap``, then ``total >= n * cap >=
        total + 1``, a contradiction; so some worker has ``load <= cap - 1``. The walk visits
        every ring member, hence finds it, unless it is not on the ring at all; that case
        (eligible workers the ring does not know) falls back to the least loaded eligible
        worker, which is under the cap too (its load <= total / n < cap). Loads are >= 0.
        """
        if not loads:
            raise ValueError("bounded load needs at least one eligible worker")
        cap = load_cap(load_factor, sum(loads.values()), len(loads), floor)
        owner: WorkerId | None = None
        owner_full = False
        best: WorkerId | None = None
        found = 0
        for member in self.ring.walk(key):
            load = loads.get(member)
            if load is None:
                continue
            if owner is None:
                owner = member
                owner_full = load >= cap
            if load < cap:  # load + 1 <= cap
                if best is None or load < loads[best]:
                    best = member
                found += 1
                if found >= choices:
                    break
        if best is not None:
            return BoundedChoice(best, owner_full, owner, cap)
        # Unreachable for a ring that holds every eligible worker (see the proof above).
        fallback = min(loads, key=lambda worker: (loads[worker], worker))
        return BoundedChoice(fallback, fallback != owner, owner, cap)
