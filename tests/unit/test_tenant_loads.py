"""Per-tenant in-flight accounting on the load boards and the gate that admits against it,
without Redis: local counts, the scope the limit covers, and the reply of the publish script."""

from __future__ import annotations

import inspect

import pytest

from router.loads import (
    InFlightCounts,
    LocalLoadBoard,
    RedisLoadBoard,
    TenantLoads,
    TenantScope,
    parse_totals,
)
from router.tenants import TenantGate

UNREACHABLE = "redis://127.0.0.1:1/0"


class FleetStub:
    """A board whose other replicas hold ``others`` requests per tenant."""

    def __init__(self, others: dict[str, int], scope: TenantScope = "fleet") -> None:
        self.local = LocalLoadBoard()
        self.others = others
        self.scope: TenantScope = scope

    def acquire_tenant(self, tenant: str) -> None:
        self.local.acquire_tenant(tenant)

    def release_tenant(self, tenant: str) -> None:
        self.local.release_tenant(tenant)

    def tenant_load(self, tenant: str) -> int:
        return self.local.tenant_load(tenant) + self.others.get(tenant, 0)

    def local_tenant_load(self, tenant: str) -> int:
        return self.local.tenant_load(tenant)

    @property
    def tenant_scope(self) -> TenantScope:
        return self.scope


@pytest.mark.parametrize("board_type", [LocalLoadBoard, RedisLoadBoard])
def test_boards_have_the_tenant_methods(board_type: type) -> None:
    """Both boards count tenants with the same methods and parameters as the protocol."""
    for name in ("acquire_tenant", "release_tenant", "tenant_load", "local_tenant_load"):
        ours = inspect.signature(getattr(board_type, name)).parameters
        theirs = inspect.signature(getattr(TenantLoads, name)).parameters
        assert list(ours) == list(theirs), name
    assert isinstance(board_type.tenant_scope, property)


def test_counts_forget_keys_that_go_idle() -> None:
    """A key released as often as acquired leaves the table; a stray release stays at zero."""
    counts: InFlightCounts[str] = InFlightCounts()
    counts.acquire("a")
    counts.acquire("a")
    counts.acquire("b")
    counts.release("b")
    counts.release("b")
    assert counts.snapshot() == {"a": 2}
    assert counts.get("b") == 0


def test_local_board_counts_tenants_apart_from_workers() -> None:
    """Tenant counts go up and down with their own calls and never show up as worker loads."""
    board = LocalLoadBoard()
    board.acquire_tenant("alpha")
    board.acquire_tenant("alpha")
    board.acquire_tenant("beta")
    board.release_tenant("beta")
    assert (board.tenant_load("alpha"), board.local_tenant_load("alpha")) == (2, 2)
    assert board.tenant_loads() == {"alpha": 2}
    assert board.loads() == {}
    assert board.tenant_scope == "replica"


def test_unstarted_redis_board_limits_tenants_on_its_own_counts() -> None:
    """A Redis board that never reached Redis counts tenants locally and says it is a fallback."""
    board = RedisLoadBoard(UNREACHABLE, replica_id="r1")
    board.acquire_tenant("alpha")
    board.release_tenant("beta")
    assert board.tenant_load("alpha") == 1
    assert board.tenant_loads() == {"alpha": 1}
    assert board.tenant_others() == {}
    assert board.tenant_scope == "fallback"


def test_gate_admits_up_to_the_limit_and_frees_on_leave() -> None:
    """A tenant is admitted until the limit, refused without being counted, and admitted
    again once a request leaves; no limit means no refusal."""
    gate = TenantGate()
    assert [gate.enter("alpha", 2) for _ in range(3)] == [True, True, False]
    assert gate.inflight("alpha") == 2
    gate.leave("alpha")
    assert gate.enter("alpha", 2)
    assert all(gate.enter("beta", None) for _ in range(50))
    assert gate.scope == "replica"


def test_gate_counts_the_other_replicas_against_the_limit() -> None:
    """With 3 in flight elsewhere and a limit of 4, this replica admits one; other tenants
    are unaffected; once the others finish, the full limit is free here."""
    board = FleetStub({"alpha": 3})
    gate = TenantGate(board)
    assert [gate.enter("alpha", 4) for _ in range(2)] == [True, False]
    assert (gate.inflight("alpha"), gate.fleet_inflight("alpha")) == (1, 4)
    assert gate.enter("beta", 4)
    board.others = {}
    assert [gate.enter("alpha", 4) for _ in range(4)] == [True, True, True, False]
    assert gate.scope == "fleet"


def test_gate_refuses_when_others_alone_exceed_the_limit() -> None:
    """Other replicas already over the limit (a lowered limit, an overshoot) mean a 429 here."""
    gate = TenantGate(FleetStub({"alpha": 7}))
    assert not gate.enter("alpha", 4)
    assert gate.inflight("alpha") == 0


def test_publish_reply_is_parsed_into_positive_counts() -> None:
    """The script's flat reply becomes a mapping; non-UTF-8 names do not raise; counts below
    one are dropped."""
    reply = [b"alpha", 2, b"beta", 0, "gamma", 5, b"\xff", 1]
    assert parse_totals(reply) == {"alpha": 2, "gamma": 5, "\ufffd": 1}
    assert parse_totals([]) == {}
