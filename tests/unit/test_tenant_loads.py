"""Per-tenant in-flight accounting on the load boards and the gate that admits against it,
without Redis: local counts, the scope the limit covers, and the reply of the publish script."""

from __future__ import annotations

import inspect

import pytest

from router.loads import (
    Admission,
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

    async def admit_tenant(self, tenant: str, limit: int) -> Admission:
        if self.tenant_load(tenant) >= limit:
            return Admission(False, "fleet")
        self.local.acquire_tenant(tenant)
        return Admission(True, "fleet")

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
    names = ("admit_tenant", "acquire_tenant", "release_tenant", "tenant_load", "local_tenant_load")
    for name in names:
        ours = inspect.signature(getattr(board_type, name)).parameters
        theirs = inspect.signature(getattr(TenantLoads, name)).parameters
        assert list(ours) == list(theirs), name
        assert inspect.iscoroutinefunction(getattr(board_type, name)) == (name == "admit_tenant")
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


async def test_unstarted_redis_board_limits_tenants_on_its_own_counts() -> None:
    """A Redis board that never reached Redis admits on its own counts, without waiting, and
    says each decision was a fallback."""
    board = RedisLoadBoard(UNREACHABLE, replica_id="r1")
    assert [await board.admit_tenant("gamma", 1) for _ in range(2)] == [
        Admission(True, "local"),
        Admission(False, "local"),
    ]
    assert Admission(True, "local").fallback
    assert not Admission(True, "fleet").fallback
    board.release_tenant("gamma")
    board.acquire_tenant("alpha")
    board.release_tenant("beta")
    assert board.tenant_load("alpha") == 1
    assert board.tenant_loads() == {"alpha": 1}
    assert board.tenant_others() == {}
    assert board.tenant_scope == "fallback"


async def admitted(gate: TenantGate, tenant: str, limit: int | None, times: int) -> list[bool]:
    return [(await gate.enter(tenant, limit)).admitted for _ in range(times)]


async def test_gate_admits_up_to_the_limit_and_frees_on_leave() -> None:
    """A tenant is admitted until the limit, refused without being counted, and admitted
    again once a request leaves; no limit means no refusal."""
    gate = TenantGate()
    assert await admitted(gate, "alpha", 2, 3) == [True, True, False]
    assert gate.inflight("alpha") == 2
    gate.leave("alpha")
    assert await gate.enter("alpha", 2) == Admission(True, "replica")
    assert await admitted(gate, "beta", None, 50) == [True] * 50
    assert (await gate.enter("beta", None)).basis == "unlimited"
    assert gate.scope == "replica"


async def test_gate_counts_the_other_replicas_against_the_limit() -> None:
    """With 3 in flight elsewhere and a limit of 4, this replica admits one; other tenants
    are unaffected; once the others finish, the full limit is free here."""
    board = FleetStub({"alpha": 3})
    gate = TenantGate(board)
    assert await admitted(gate, "alpha", 4, 2) == [True, False]
    assert (gate.inflight("alpha"), gate.fleet_inflight("alpha")) == (1, 4)
    assert await admitted(gate, "beta", 4, 1) == [True]
    board.others = {}
    assert await admitted(gate, "alpha", 4, 4) == [True, True, True, False]
    assert gate.scope == "fleet"


async def test_gate_refuses_when_others_alone_exceed_the_limit() -> None:
    """Other replicas already over the limit (a lowered limit, an overshoot) mean a 429 here."""
    gate = TenantGate(FleetStub({"alpha": 7}))
    assert await admitted(gate, "alpha", 4, 1) == [False]
    assert gate.inflight("alpha") == 0


def test_publish_reply_is_parsed_into_positive_counts() -> None:
    """The script's flat reply becomes a mapping; non-UTF-8 names do not raise; counts below
    one are dropped."""
    reply = [b"alpha", 2, b"beta", 0, "gamma", 5, b"\xff", 1]
    assert parse_totals(reply) == {"alpha": 2, "gamma": 5, "\ufffd": 1}
    assert parse_totals([]) == {}
