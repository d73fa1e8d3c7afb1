"""Routing policies, one per module, each a pure ``choose(request, view) -> Decision``.

`make_policy` maps a configured `PolicyName` to a fresh policy; callers never switch on the
policy's type.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import get_args

from router.core.model import Policy, PolicyName
from router.core.policies.cache_aware import CacheAware
from router.core.policies.consistent_hash import ConsistentHash
from router.core.policies.least_loaded import LeastLoaded
from router.core.policies.round_robin import RoundRobin

POLICY_NAMES: tuple[PolicyName, ...] = get_args(PolicyName)

POLICIES: Mapping[PolicyName, Callable[[], Policy]] = MappingProxyType(
    {
        "round_robin": RoundRobin,
        "least_loaded": LeastLoaded,
        "consistent_hash": ConsistentHash,
        "cache_aware": CacheAware,
    }
)
"""Constructor for each policy name (read-only)."""


def make_policy(name: str) -> Policy:
    """A new policy instance for ``name``; ValueError listing the known names otherwise."""
    try:
        factory = POLICIES[name]  # type: ignore[index]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; expected one of {POLICY_NAMES}") from None
    return factory()


__all__ = [
    "POLICIES",
    "POLICY_NAMES",
    "CacheAware",
    "ConsistentHash",
    "LeastLoaded",
    "RoundRobin",
    "make_policy",
]
