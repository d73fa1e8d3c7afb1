"""In-flight accounting without Redis: the local board, merging counts, and a Redis board that
was never started (or whose Redis is unreachable) behaving exactly like a local one."""

from __future__ import annotations

import inspect

import pytest

from router.core.model import WorkerId
from router.loads import LoadBoard, LocalLoadBoard, RedisLoadBoard, merge_loads

A, B = WorkerId("a"), WorkerId("b")
UNREACHABLE = "redis://127.0.0.1:1/0"


@pytest.mark.parametrize("board_type", [LocalLoadBoard, RedisLoadBoard])
def test_boards_satisfy_the_protocol(board_type: type) -> None:
    """Both boards have every LoadBoard method, with the same parameters and async-ness."""
    for name in ("acquire", "release", "load", "loads", "start", "close"):
        ours = getattr(board_type, name)
        theirs = getattr(LoadBoard, name)
        assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(theirs), name
        ours_required = [
            p.name
            for p in inspect.signature(ours).parameters.values()
            if p.default is inspect.Parameter.empty and p.kind is not p.KEYWORD_ONLY
        ]
        assert ours_required == list(inspect.signature(theirs).parameters), name


def test_local_board_counts_requests_in_flight() -> None:
    """Each acquire adds one to a worker's load and each release takes one away."""
    board = LocalLoadBoard()
    board.acquire(A)
    board.acquire(A)
    board.acquire(B)
    assert (board.load(A), board.load(B)) == (2, 1)
    board.release(A)
    assert board.loads() == {A: 1, B: 1}
    board.release(A)
    board.release(B)
    assert board.loads() == {}
    assert board.load(A) == 0


def test_local_board_never_goes_below_zero() -> None:
    """A stray release does not make a worker look emptier than idle."""
    board = LocalLoadBoard()
    board.release(A)
    board.acquire(A)
    board.release(A)
    board.release(A)
    assert board.load(A) == 0
    board.acquire(A)
    assert board.load(A) == 1


def test_local_board_snapshot_is_a_copy() -> None:
    """Changing the returned mapping does not change the board."""
    board = LocalLoadBoard()
    board.acquire(A)
    board.loads()[A] = 99
    assert board.load(A) == 1


async def test_local_board_start_and_close_are_harmless() -> None:
    """The local board has nothing to open or close, and keeps counting through both."""
    board = LocalLoadBoard()
    await board.start()
    board.acquire(A)
    await board.close()
    assert board.load(A) == 1


def test_merge_sums_per_worker_and_drops_idle_ones() -> None:
    """Merged loads add up each worker's counts; zero and negative counts contribute nothing."""
    assert merge_loads({A: 2, B: 0}, {A: 3, WorkerId("c"): -4}, {B: 1}) == {A: 5, B: 1}
    assert merge_loads() == {}


def test_unstarted_redis_board_counts_locally() -> None:
    """A Redis board that never reached Redis counts this replica's requests like a local one."""
    board = RedisLoadBoard(UNREACHABLE, replica_id="r1")
    board.acquire(A)
    board.acquire(A)
    board.release(B)
    assert board.loads() == {A: 2}
    assert board.load(A) == 2
    assert board.local_loads() == {A: 2}
    assert not board.available


async def test_unreachable_redis_board_never_raises() -> None:
    """With Redis unreachable, start, sync and close succeed and the counts stay local."""
    board = RedisLoadBoard(UNREACHABLE, replica_id="r1", op_timeout_s=0.2)
    await board.start()
    board.acquire(B)
    assert await board.sync() is False
    assert board.loads() == {B: 1}
    await board.close()
    assert board.load(B) == 1


def test_replica_ids_are_unique_by_default() -> None:
    """Two boards in one process get different replica ids, so they never overwrite each other."""
    assert RedisLoadBoard(UNREACHABLE).replica_id != RedisLoadBoard(UNREACHABLE).replica_id


def test_replica_ttl_must_outlast_the_publish_interval() -> None:
    """A TTL shorter than the publish interval would expire live replicas; it is refused."""
    with pytest.raises(ValueError, match="replica_ttl_s"):
        RedisLoadBoard(UNREACHABLE, publish_interval_s=1.0, replica_ttl_s=0.5)
