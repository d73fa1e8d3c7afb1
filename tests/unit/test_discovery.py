"""Membership and DNS discovery without a network: sources own their workers, removal
clears the warm index, and bad answers change nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from pydantic import ValidationError

from router.config import DiscoverySettings, HealthSettings, TelemetrySettings, WorkerSpec
from router.core.model import BlockHash, WorkerId
from router.discovery import DnsDiscovery, Membership, discovered_spec
from router.index.memory import MemoryWarmIndex
from router.telemetry import Metrics
from router.workers import WorkerPool


def _parts() -> tuple[WorkerPool, MemoryWarmIndex, Metrics, Membership]:
    pool = WorkerPool([], HealthSettings(), vnodes=16)
    index = MemoryWarmIndex(1000, 60.0)
    metrics = Metrics(TelemetrySettings())
    return pool, index, metrics, Membership(pool, index, metrics)


def _spec(name: str) -> WorkerSpec:
    return WorkerSpec(url=f"http://{name}:8000", id=name)


def _ids(pool: WorkerPool) -> set[str]:
    return {w.id for w in pool.members()}


async def test_sync_adds_and_removes_only_the_sources_own_workers() -> None:
    """A source's sync adds what is new and removes what it no longer lists, leaving
    workers from other sources (static list, admin API) alone."""
    pool, _, _, membership = _parts()
    await membership.sync("static", [_spec("s1")])
    pool.add(_spec("admin1"))
    added, removed = await membership.sync("dns", [_spec("d1"), _spec("d2")])
    assert (sorted(added), removed) == (["d1", "d2"], [])
    added, removed = await membership.sync("dns", [_spec("d2"), _spec("d3")])
    assert (added, removed) == (["d3"], ["d1"])
    assert _ids(pool) == {"s1", "admin1", "d2", "d3"}
    await membership.sync("dns", [])
    assert _ids(pool) == {"s1", "admin1"}


async def test_a_removed_worker_loses_its_warm_entries_and_keeps_its_object() -> None:
    """Removal clears the index for that worker; the Worker object in-flight requests hold
    is marked removed rather than destroyed."""
    pool, index, _, membership = _parts()
    await membership.sync("dns", [_spec("d1"), _spec("d2")])
    chain = [BlockHash(1), BlockHash(2)]
    await index.record(WorkerId("d1"), chain, "confirmed")
    await index.record(WorkerId("d2"), chain, "confirmed")
    held = pool.get(WorkerId("d1"))
    assert held is not None
    await membership.sync("dns", [_spec("d2")])
    assert await index.lookup(chain) == {"d2": 2}
    assert held.removed


async def test_a_changed_url_replaces_the_worker() -> None:
    """The same id at a new URL is removed and added again (new connection pool, no stale
    warm entries)."""
    pool, _, _, membership = _parts()
    await membership.sync("static", [WorkerSpec(url="http://a:8000", id="w")])
    added, removed = await membership.sync("static", [WorkerSpec(url="http://b:8000", id="w")])
    assert (added, removed) == (["w"], ["w"])
    worker = pool.get(WorkerId("w"))
    assert worker is not None
    assert worker.url == "http://b:8000"


async def test_an_id_taken_by_another_source_is_not_added_twice() -> None:
    """A DNS answer naming a worker the static list already has leaves it to the list."""
    pool, _, _, membership = _parts()
    await membership.sync("static", [_spec("10.0.0.1")])
    added, _ = await membership.sync("dns", [_spec("10.0.0.1")])
    assert added == []
    await membership.sync("dns", [])
    assert _ids(pool) == {"10.0.0.1"}


def test_discovered_workers_are_named_ip_colon_port() -> None:
    """IPv4 and IPv6 addresses become URLs and ids a person can read (v6 in brackets)."""
    settings = DiscoverySettings(kind="dns", name="svc.local", port=8001, scheme="https")
    v4 = discovered_spec("10.1.2.3", settings)
    assert (v4.url, v4.worker_id) == ("https://10.1.2.3:8001", "10.1.2.3:8001")
    v6 = discovered_spec("fd00::5", settings)
    assert (v6.url, v6.worker_id) == ("https://[fd00::5]:8001", "[fd00::5]:8001")


class Answers:
    def __init__(self, *answers: Sequence[str] | Exception) -> None:
        self.answers = list(answers)

    async def __call__(self, name: str, port: int) -> Sequence[str]:
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def _discovery(resolver: Answers, **settings: object) -> tuple[DnsDiscovery, WorkerPool]:
    pool, _, metrics, membership = _parts()
    config = DiscoverySettings.model_validate({"kind": "dns", "name": "svc.local", **settings})
    return DnsDiscovery(config, membership, metrics, resolver), pool


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("any", {"10.0.0.1:8000", "[fd00::1]:8000"}),
        ("ipv4", {"10.0.0.1:8000"}),
        ("ipv6", {"[fd00::1]:8000"}),
    ],
)
async def test_the_address_family_setting_filters_the_answer(
    family: str, expected: set[str]
) -> None:
    """On a dual-stack name, `family` decides whether each pod counts once (v4 or v6)."""
    discovery, pool = _discovery(Answers(["10.0.0.1", "fd00::1"]), family=family)
    assert await discovery.refresh()
    assert _ids(pool) == expected


@pytest.mark.parametrize(
    "bad", [OSError("Name or service not known"), [], ["fd00::1"], ValueError("bad address")]
)
async def test_failed_empty_or_unusable_answers_keep_the_members(
    bad: Sequence[str] | Exception,
) -> None:
    """An error, an empty answer, or only addresses of the wrong family change nothing."""
    discovery, pool = _discovery(Answers(["10.0.0.1"], bad), family="ipv4")
    assert await discovery.refresh()
    assert not await discovery.refresh()
    assert _ids(pool) == {"10.0.0.1:8000"}


async def test_a_resolver_that_hangs_times_out_after_the_interval() -> None:
    """A resolution that does not answer within interval_s counts as failed."""
    hung = asyncio.Event()

    async def never(name: str, port: int) -> Sequence[str]:
        await hung.wait()
        return []

    pool, _, metrics, membership = _parts()
    config = DiscoverySettings(kind="dns", name="svc.local", interval_s=0.05)
    discovery = DnsDiscovery(config, membership, metrics, never)
    assert not await discovery.refresh()
    assert b'prefix_router_discovery_resolutions_total{result="error"} 1.0' in metrics.render()
    assert _ids(pool) == set()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kind": "dns"}, "discovery.name is not set"),
        ({"kind": "dns", "name": "bad name!"}, "must be a DNS name"),
        ({"kind": "dns", "name": "-x.svc"}, "must be a DNS name"),
    ],
)
def test_discovery_settings_are_validated(values: dict[str, str], message: str) -> None:
    """DNS discovery without a name, or with something that is not a DNS name, is refused."""
    with pytest.raises(ValidationError, match=message):
        DiscoverySettings.model_validate(values)


def test_a_trailing_dot_is_accepted() -> None:
    """A fully qualified name with its trailing dot is the same name."""
    settings = DiscoverySettings(kind="dns", name="vllm.llm.svc.cluster.local.")
    assert settings.name == "vllm.llm.svc.cluster.local"
