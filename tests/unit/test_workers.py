"""Worker pool: the circuit breaker's state machine (on an injected clock), membership, the
ring's stability under health flaps, and in-flight accounting."""

from __future__ import annotations

import random

import pytest

from router.config import HealthSettings, WorkerSpec
from router.core.model import WorkerId
from router.workers import Worker, WorkerPool

HEALTH = HealthSettings(failures_to_eject=3, eject_base_s=2.0, eject_max_s=10.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def _specs(*names: str) -> list[WorkerSpec]:
    return [WorkerSpec(url=f"http://{name}:8000", id=name) for name in names]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ejected() -> list[str]:
    return []


@pytest.fixture
def pool(clock: FakeClock, ejected: list[str]) -> WorkerPool:
    return WorkerPool(
        _specs("a", "b", "c"),
        HEALTH,
        vnodes=32,
        clock=clock,
        on_eject=lambda w: ejected.append(w.id),
    )


def _worker(pool: WorkerPool, name: str) -> Worker:
    worker = pool.get(WorkerId(name))
    assert worker is not None
    return worker


def _ids(workers: tuple[Worker, ...] | list[Worker]) -> list[str]:
    return [w.id for w in workers]


def _state(worker: Worker) -> str:
    # Read through a function so each check sees the live state (mypy would narrow it).
    return worker.state


def _fail(pool: WorkerPool, worker: Worker, times: int) -> None:
    for _ in range(times):
        pool.report_failure(worker, "HTTP 503")


def test_new_pool_routes_to_every_member(pool: WorkerPool) -> None:
    """All configured workers start healthy and routable, in config order."""
    assert _ids(pool.routable()) == ["a", "b", "c"]
    assert [w["id"] for w in pool.snapshot()] == ["a", "b", "c"]
    assert all(w["healthy"] for w in pool.snapshot())


def test_ejected_after_n_consecutive_failures(pool: WorkerPool, ejected: list[str]) -> None:
    """A worker leaves rotation exactly at failures_to_eject consecutive failures."""
    a = _worker(pool, "a")
    _fail(pool, a, 2)
    assert "a" in _ids(pool.routable())
    pool.report_failure(a, "connect refused")
    assert _ids(pool.routable()) == ["b", "c"]
    assert _state(a) == "ejected"
    assert a.last_error == "connect refused"
    assert ejected == ["a"]
    assert a.ejections_total == 1


def test_success_resets_the_failure_count(pool: WorkerPool) -> None:
    """Failures separated by a success are not consecutive and do not eject."""
    a = _worker(pool, "a")
    for _ in range(5):
        _fail(pool, a, 2)
        pool.report_success(a)
    assert _state(a) == "healthy"
    assert a.failures_total == 10
    assert a.consecutive_failures == 0


def test_passing_probe_also_resets_the_failure_count(pool: WorkerPool) -> None:
    """A passing health probe between failures breaks the run, as a success does."""
    a = _worker(pool, "a")
    _fail(pool, a, 2)
    pool.probe_result(a, True)
    _fail(pool, a, 2)
    assert _state(a) == "healthy"


def test_failed_probes_count_towards_ejection(pool: WorkerPool) -> None:
    """Failed health probes eject a worker just like failed requests."""
    a = _worker(pool, "a")
    for _ in range(3):
        pool.probe_result(a, False)
    assert _state(a) == "ejected"
    assert a.last_error == "health probe failed"


def test_half_open_after_the_ejection_time(pool: WorkerPool, clock: FakeClock) -> None:
    """After the ejection time a worker is probed (half-open) but still gets no traffic."""
    a = _worker(pool, "a")
    _fail(pool, a, 3)
    assert "a" not in _ids(pool.due_for_probe())
    clock.now += HEALTH.eject_base_s - 0.01
    assert "a" not in _ids(pool.due_for_probe())
    assert _state(a) == "ejected"
    clock.now += 0.02
    assert "a" in _ids(pool.due_for_probe())
    assert _state(a) == "half_open"
    assert "a" not in _ids(pool.routable())


def test_probe_success_closes_the_circuit(pool: WorkerPool, clock: FakeClock) -> None:
    """A passing probe in half-open puts the worker back in rotation."""
    a = _worker(pool, "a")
    _fail(pool, a, 3)
    clock.now += HEALTH.eject_base_s
    pool.routable()
    pool.probe_result(a, True)
    assert _state(a) == "healthy"
    assert _ids(pool.routable()) == ["a", "b", "c"]


def test_probe_failure_re_ejects_for_longer(pool: WorkerPool, clock: FakeClock) -> None:
    """A failing probe in half-open ejects again, for twice as long."""
    a = _worker(pool, "a")
    _fail(pool, a, 3)
    assert a.ejected_until == pytest.approx(clock.now + 2.0)
    clock.now += 2.0
    pool.routable()
    assert _state(a) == "half_open"
    pool.probe_result(a, False, "health probe: HTTP 500")
    assert _state(a) == "ejected"
    assert a.ejected_until == pytest.approx(clock.now + 4.0)
    assert a.last_error == "health probe: HTTP 500"
    assert a.ejections_total == 2


def test_one_failure_in_half_open_re_ejects(pool: WorkerPool, clock: FakeClock) -> None:
    """In half-open a single failure is enough to eject again."""
    a = _worker(pool, "a")
    _fail(pool, a, 3)
    clock.now += 2.0
    pool.routable()
    pool.report_failure(a, "reset")
    assert _state(a) == "ejected"


def test_ejection_length_doubles_and_is_capped(pool: WorkerPool, clock: FakeClock) -> None:
    """Repeated ejections last 2, 4, 8 s, then stay at eject_max_s."""
    a = _worker(pool, "a")
    lengths: list[float] = []
    _fail(pool, a, 3)
    for _ in range(5):
        length = a.ejected_until - clock.now
        lengths.append(round(length, 6))
        clock.now += length
        pool.routable()
        assert _state(a) == "half_open"
        pool.probe_result(a, False)
    assert lengths == [2.0, 4.0, 8.0, 10.0, 10.0]


def test_recovery_resets_the_ejection_length(pool: WorkerPool, clock: FakeClock) -> None:
    """After a worker recovered, its next ejection starts again from eject_base_s."""
    a = _worker(pool, "a")
    _fail(pool, a, 3)
    clock.now += 2.0
    pool.routable()
    pool.probe_result(a, False)  # 4 s now
    clock.now += 4.0
    pool.routable()
    pool.probe_result(a, True)
    _fail(pool, a, 3)
    assert a.ejected_until - clock.now == pytest.approx(2.0)


def test_late_success_does_not_cut_an_ejection_short(pool: WorkerPool, clock: FakeClock) -> None:
    """A request sent before the ejection that succeeds after it leaves the worker ejected."""
    a = _worker(pool, "a")
    _fail(pool, a, 3)
    until = a.ejected_until
    pool.report_success(a)  # e.g. a long stream started before the failures
    assert _state(a) == "ejected"
    assert a.ejected_until == until
    assert "a" not in _ids(pool.routable())
    # ... nor resets the doubling: the next ejection is longer.
    clock.now = until
    pool.routable()
    pool.probe_result(a, False)
    assert a.ejected_until - clock.now == pytest.approx(4.0)


def test_failures_while_ejected_do_not_extend_the_ejection(
    pool: WorkerPool, clock: FakeClock
) -> None:
    """Late failures of requests already in flight do not restart the ejection timer."""
    a = _worker(pool, "a")
    _fail(pool, a, 3)
    until = a.ejected_until
    clock.now += 1.0
    _fail(pool, a, 5)
    assert a.ejected_until == until
    assert a.ejections_total == 1


def test_all_ejected_means_nothing_routable(pool: WorkerPool) -> None:
    """When every worker is ejected no worker is routable."""
    for worker in pool.members():
        _fail(pool, worker, 3)
    assert pool.routable() == ()


def test_snapshot_shows_state_and_remaining_ejection(pool: WorkerPool, clock: FakeClock) -> None:
    """The admin snapshot shows each worker's state, counters and time left ejected."""
    a = _worker(pool, "a")
    pool.acquire(a)
    _fail(pool, a, 3)
    clock.now += 0.5
    entry = next(w for w in pool.snapshot() if w["id"] == "a")
    assert entry["state"] == "ejected"
    assert entry["healthy"] is False
    assert entry["ejected_for_s"] == 1.5
    assert entry["inflight"] == 1
    assert entry["failures_total"] == 3
    assert entry["ejections_total"] == 1
    assert entry["url"] == "http://a:8000"


# membership and ring --------------------------------------------------------------------------


def _owners(pool: WorkerPool, keys: list[int]) -> list[str | None]:
    return [pool.ring.owner(k) for k in keys]


def _keys(count: int, seed: int = 3) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(64) for _ in range(count)]


KEYS = _keys(2000)


def test_health_flaps_do_not_move_keys(pool: WorkerPool, clock: FakeClock) -> None:
    """Ejecting and restoring a worker leaves the ring (and every key's owner) unchanged."""
    ring = pool.ring
    before = _owners(pool, KEYS)
    a = _worker(pool, "a")
    _fail(pool, a, 3)
    assert pool.ring is ring
    assert pool.ring.members == {"a", "b", "c"}
    assert _owners(pool, KEYS) == before
    clock.now += 2.0
    pool.routable()
    pool.probe_result(a, True)
    assert pool.ring is ring


def test_removing_a_member_moves_only_its_keys(pool: WorkerPool) -> None:
    """Removing a worker rebuilds the ring; keys it did not own keep their owner."""
    before = _owners(pool, KEYS)
    removed = pool.remove(WorkerId("b"))
    assert removed.removed
    after = _owners(pool, KEYS)
    assert pool.ring.members == {"a", "c"}
    assert "b" not in after
    for old, new in zip(before, after, strict=True):
        if old != "b":
            assert new == old
    assert _ids(pool.routable()) == ["a", "c"]


def test_adding_a_member_moves_keys_only_to_it(pool: WorkerPool) -> None:
    """A new worker takes over some keys; no key moves between the old workers."""
    before = _owners(pool, KEYS)
    added = pool.add(WorkerSpec(url="http://d:8000", id="d"))
    assert _state(added) == "healthy"
    after = _owners(pool, KEYS)
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert moved
    assert all(new == "d" for _, new in moved)
    assert 0.1 < len(moved) / len(KEYS) < 0.45  # about 1/4
    assert _ids(pool.routable()) == ["a", "b", "c", "d"]


def test_adding_an_existing_member_is_refused(pool: WorkerPool) -> None:
    """A worker id can be a member only once."""
    with pytest.raises(ValueError, match="already a member"):
        pool.add(WorkerSpec(url="http://elsewhere:1", id="a"))
    with pytest.raises(KeyError):
        pool.remove(WorkerId("zzz"))


def test_removed_worker_keeps_in_flight_accounting_safe(pool: WorkerPool) -> None:
    """Requests in flight on a removed worker finish and release without touching a new one."""
    b = _worker(pool, "b")
    pool.acquire(b)
    pool.acquire(b)
    pool.remove(WorkerId("b"))
    replacement = pool.add(WorkerSpec(url="http://b:8000", id="b"))
    assert replacement is not b
    # The in-flight requests finish, one well and one badly, after the removal.
    pool.report_success(b)
    pool.release(b)
    _fail(pool, b, 5)
    pool.release(b)
    assert b.inflight == 0
    assert _state(b) == "healthy"  # a removed worker is never ejected
    assert replacement.inflight == 0
    assert replacement.consecutive_failures == 0
    assert _state(replacement) == "healthy"
    assert _ids(pool.routable()) == ["a", "c", "b"]


def test_acquire_and_release_count_in_flight(pool: WorkerPool) -> None:
    """In-flight rises with each request sent and falls when it finishes."""
    a = _worker(pool, "a")
    for _ in range(3):
        pool.acquire(a)
    pool.release(a)
    assert a.inflight == 2
    assert a.requests_total == 3
