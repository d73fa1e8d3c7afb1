"""Worker membership from its sources: the static list, DNS, and (untracked) the admin API.

`Membership` applies one source's current list to the `WorkerPool`: it adds what is new,
removes what the source no longer lists (clearing the warm index for it), and never touches
members another source added. A removed worker's in-flight requests finish normally (the pool
keeps their `Worker` object alive); only new decisions stop choosing it.

`DnsDiscovery` re-resolves ``discovery.name`` (a Kubernetes headless Service: one address
record per ready pod) every ``interval_s`` and hands the addresses to `Membership` as workers
``scheme://ip:port`` with id ``ip:port``. A resolution that fails, times out or comes back
empty changes nothing: a DNS hiccup must not empty the pool. The resolver is a plain async
callable, so tests inject one that returns changing lists of loopback addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence

from router.config import DiscoverySettings, WorkerSpec
from router.core.model import WorkerId
from router.index import WarmIndex
from router.telemetry import Metrics
from router.workers import WorkerPool

log = logging.getLogger("prefix_router.discovery")

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``(name, port) -> addresses``: every IP address ``name`` currently resolves to."""


async def resolve_addresses(name: str, port: int) -> list[str]:
    """Every A and AAAA record of ``name``, through the system resolver (``getaddrinfo``)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class Membership:
    """Applies each source's list of workers to the pool, and remembers who added whom."""

    def __init__(self, pool: WorkerPool, index: WarmIndex, metrics: Metrics) -> None:
        self._pool = pool
        self._index = index
        self._metrics = metrics
        self._owned: dict[str, dict[WorkerId, str]] = {}
        self._lock = asyncio.Lock()

    def adopt(self, source: str, specs: Sequence[WorkerSpec]) -> None:
        """Record that ``specs`` (already in the pool) came from ``source``."""
        self._owned[source] = {WorkerId(s.worker_id): s.url for s in specs}

    def owned(self, source: str) -> dict[WorkerId, str]:
        return dict(self._owned.get(source, {}))

    async def sync(
        self, source: str, specs: Sequence[WorkerSpec]
    ) -> tuple[list[WorkerId], list[WorkerId]]:
        """Make ``source``'s members exactly ``specs``; returns (added, removed) ids."""
        async with self._lock:
            owned = self._owned.setdefault(source, {})
            # A member removed through the admin API is no longer ours to remove.
            for worker_id in [w for w in owned if self._pool.get(w) is None]:
                del owned[worker_id]
            wanted = {WorkerId(s.worker_id): s for s in specs}
            removed = [w for w, url in owned.items() if w not in wanted or wanted[w].url != url]
            for worker_id in removed:
                del owned[worker_id]
                self._pool.remove(worker_id)
                self._metrics.worker_removed(worker_id)
                try:
                    await self._index.clear(worker_id)
                except Exception:
                    # The entries age out (LRU, TTL); membership must not wait on the index.
                    self._metrics.index_errors.labels("clear").inc()
                    log.warning("could not clear the warm index of a removed worker",
                                extra={"fields": {"worker": worker_id}}, exc_info=True)  # fmt: skip
            added: list[WorkerId] = []
            for worker_id, spec in wanted.items():
                if worker_id in owned:
                    continue
                if self._pool.get(worker_id) is not None:
                    log.info(
                        "worker already a member from another source; leaving it there",
                        extra={"fields": {"worker": worker_id, "source": source}},
                    )
                    continue
                self._pool.add(spec)
                self._metrics.worker_added(worker_id)
                owned[worker_id] = spec.url
                added.append(worker_id)
            return added, removed


def discovered_spec(address: str, settings: DiscoverySettings) -> WorkerSpec:
    """The worker at ``address``: ``scheme://ip:port``, id ``ip:port`` (``[v6]:port``)."""
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    return WorkerSpec(
        url=f"{settings.scheme}://{host}:{settings.port}", id=f"{host}:{settings.port}"
    )


class DnsDiscovery:
    """Re-resolves ``discovery.name`` every ``interval_s`` and syncs the pool to the answer."""

    SOURCE = "dns"

    def __init__(
        self,
        settings: DiscoverySettings,
        membership: Membership,
        metrics: Metrics,
        resolver: Resolver | None = None,
    ) -> None:
        assert settings.name is not None, "validated by DiscoverySettings"
        self._settings = settings
        self._name = settings.name
        self._membership = membership
        self._metrics = metrics
        self._resolver = resolver or resolve_addresses
        self._failing = False
        self.resolutions = 0
        """Resolutions attempted so far (tests wait on it instead of sleeping)."""

    async def refresh(self) -> bool:
        """Resolve once and apply the answer; False (members unchanged) when it failed."""
        settings = self._settings
        try:
            async with asyncio.timeout(settings.interval_s):
                answer = await self._resolver(self._name, settings.port)
            addresses = sorted({a for a in answer if _family_ok(a, settings.family)})
            if not addresses:
                raise LookupError(f"{self._name} resolved to no {settings.family} address")
        except (OSError, LookupError, TimeoutError, ValueError) as exc:
            self.resolutions += 1
            self._metrics.discovery_resolutions.labels("error").inc()
            message = str(exc) or type(exc).__name__
            level = logging.DEBUG if self._failing else logging.WARNING
            self._failing = True
            log.log(
                level,
                "DNS discovery failed; keeping the current workers",
                extra={"fields": {"name": self._name, "error": message,
                                  "workers": len(self._membership.owned(self.SOURCE))}},
            )  # fmt: skip
            return False
        self.resolutions += 1
        self._metrics.discovery_resolutions.labels("ok").inc()
        if self._failing:
            self._failing = False
            log.info("DNS discovery recovered", extra={"fields": {"name": self._name}})
        specs = [discovered_spec(a, settings) for a in addresses]
        added, removed = await self._membership.sync(self.SOURCE, specs)
        if added:
            self._metrics.discovery_changes.labels("added").inc(len(added))
        if removed:
            self._metrics.discovery_changes.labels("removed").inc(len(removed))
        if added or removed:
            log.info(
                "DNS discovery changed the workers",
                extra={"fields": {"name": self._name, "added": added, "removed": removed,
                                  "workers": len(specs)}},
            )  # fmt: skip
        return True

    async def run_forever(self) -> None:
        """`refresh` every ``interval_s``, forever (the app's cleanup context cancels it)."""
        while True:
            await asyncio.sleep(self._settings.interval_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                # One bad round (a bug, an odd answer) must not end discovery for good.
                self._metrics.discovery_resolutions.labels("error").inc()
                log.exception("DNS discovery round failed", extra={"fields": {"name": self._name}})


def _family_ok(address: str, family: str) -> bool:
    version = ipaddress.ip_address(address.split("%", 1)[0]).version
    return family == "any" or (family == "ipv4") == (version == 4)
