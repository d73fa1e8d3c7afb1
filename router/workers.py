"""Worker membership, health (circuit breaker) and in-flight load, in this process.

Each worker is a small state machine::

    healthy --(failures_to_eject consecutive failures)--> ejected
    ejected --(eject time over)--> half_open --(probe ok)--> healthy
                                            \\--(probe fails)--> ejected (time doubles)

Failures are connect errors, timeouts and 5xx answers of real requests (passive) and failed
``/health`` probes (active). Only healthy workers are routable. The consistent-hash ring is
built over all *members*, healthy or not, so a worker that flaps never moves other keys; it
is rebuilt only when membership changes, and in-flight requests keep their worker object.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from router.config import HealthSettings, WorkerSpec
from router.core.model import WorkerId
from router.core.ring import HashRing
from router.scrape import EngineStats

State = Literal["healthy", "ejected", "half_open"]


@dataclass(slots=True)
class Worker:
    id: WorkerId
    url: str
    state: State = "healthy"
    consecutive_failures: int = 0
    ejections_in_a_row: int = 0
    ejected_until: float = 0.0
    inflight: int = 0
    """Requests this replica has in flight on the worker."""
    engine: EngineStats | None = None
    """The worker's own report from its ``/metrics`` (None until the first scrape)."""
    external_load: int = 0
    """Requests the engine had that no router replica accounted for, at the last scrape."""
    requests_total: int = 0
    failures_total: int = 0
    ejections_total: int = 0
    last_error: str | None = None
    removed: bool = False

    def snapshot(self, now: float) -> dict[str, object]:
        return {
            "id": self.id,
            "url": self.url,
            "healthy": self.state == "healthy",
            "state": self.state,
            "inflight": self.inflight,
            "consecutive_failures": self.consecutive_failures,
            "ejected_for_s": round(max(0.0, self.ejected_until - now), 3),
            "requests_total": self.requests_total,
            "failures_total": self.failures_total,
            "ejections_total": self.ejections_total,
            "last_error": self.last_error,
            "engine": None
            if self.engine is None
            else {
                "running": self.engine.running,
                "waiting": self.engine.waiting,
                "kv_usage": self.engine.kv_usage,
                "block_size": self.engine.block_size,
                "num_gpu_blocks": self.engine.num_gpu_blocks,
                "external_load": self.external_load,
            },
        }


class WorkerPool:
    """Members, their health and loads. All methods are synchronous and cheap."""

    def __init__(
        self,
        specs: Iterable[WorkerSpec],
        health: HealthSettings,
        *,
        vnodes: int = 128,
        clock: Callable[[], float] = time.monotonic,
        on_eject: Callable[[Worker], None] | None = None,
    ) -> None:
        self._health = health
        self._vnodes = vnodes
        self._clock = clock
        self._on_eject = on_eject
        self._workers: dict[WorkerId, Worker] = {}
        for spec in specs:
            self._workers[WorkerId(spec.worker_id)] = Worker(WorkerId(spec.worker_id), spec.url)
        self._ring = HashRing(self._workers, vnodes=vnodes)
        self._routable: tuple[Worker, ...] = ()
        self._refresh()

    # membership -------------------------------------------------------------------------
    @property
    def ring(self) -> HashRing:
        return self._ring

    def members(self) -> list[Worker]:
        return list(self._workers.values())

    def get(self, worker_id: WorkerId) -> Worker | None:
        return self._workers.get(worker_id)

    def add(self, spec: WorkerSpec) -> Worker:
        worker_id = WorkerId(spec.worker_id)
        if worker_id in self._workers:
            raise ValueError(f"worker {worker_id!r} is already a member")
        worker = Worker(worker_id, spec.url)
        self._workers[worker_id] = worker
        self._ring = HashRing(self._workers, vnodes=self._vnodes)
        self._refresh()
        return worker

    def remove(self, worker_id: WorkerId) -> Worker:
        """Drop a member; requests already sent to it finish normally."""
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            raise KeyError(worker_id)
        worker.removed = True
        self._ring = HashRing(self._workers, vnodes=self._vnodes)
        self._refresh()
        return worker

    # health ------------------------------------------------------------------------------
    def routable(self) -> tuple[Worker, ...]:
        """Healthy members, in a stable order; ejected ones whose time is over turn half-open."""
        now = self._clock()
        if any(w.state == "ejected" and w.ejected_until <= now for w in self._workers.values()):
            for worker in self._workers.values():
                if worker.state == "ejected" and worker.ejected_until <= now:
                    worker.state = "half_open"
            self._refresh()
        return self._routable

    def due_for_probe(self) -> list[Worker]:
        """Members an active probe should check now (all but those still inside ejection)."""
        self.routable()
        return [w for w in self._workers.values() if w.state != "ejected"]

    def report_success(self, worker: Worker) -> None:
        worker.consecutive_failures = 0
        # Only half-open closes the circuit: a request sent before the ejection that finishes
        # after it says nothing about the worker now, and must not cut the ejection short or
        # reset its doubling.
        if worker.state == "half_open" and not worker.removed:
            worker.state = "healthy"
            worker.ejections_in_a_row = 0
            self._refresh()

    def report_failure(self, worker: Worker, error: str) -> None:
        worker.failures_total += 1
        worker.consecutive_failures += 1
        worker.last_error = error
        if worker.removed:
            return
        if worker.state == "half_open" or (
            worker.state == "healthy"
            and worker.consecutive_failures >= self._health.failures_to_eject
        ):
            self._eject(worker)

    def probe_result(self, worker: Worker, ok: bool, error: str = "") -> None:
        if ok:
            # A passing probe breaks a run of failures, as a successful request does.
            self.report_success(worker)
        else:
            self.report_failure(worker, error or "health probe failed")

    def _eject(self, worker: Worker) -> None:
        length = min(
            self._health.eject_base_s * (2**worker.ejections_in_a_row), self._health.eject_max_s
        )
        worker.state = "ejected"
        worker.ejected_until = self._clock() + length
        worker.ejections_in_a_row += 1
        worker.ejections_total += 1
        self._refresh()
        if self._on_eject is not None:
            self._on_eject(worker)

    def _refresh(self) -> None:
        self._routable = tuple(w for w in self._workers.values() if w.state == "healthy")

    # load --------------------------------------------------------------------------------
    @staticmethod
    def acquire(worker: Worker) -> None:
        worker.inflight += 1
        worker.requests_total += 1

    @staticmethod
    def release(worker: Worker) -> None:
        worker.inflight -= 1

    def snapshot(self) -> list[dict[str, object]]:
        now = self._clock()
        return [w.snapshot(now) for w in self._workers.values()]
