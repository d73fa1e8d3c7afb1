"""Request ids the router makes for requests that came without one."""

from __future__ import annotations

import re

from router.handlers import RequestIds


def test_made_ids_are_unique_and_shaped_like_a_uuid_hex() -> None:
    """Every id is 32 lowercase hex digits, never repeated within a process or across two."""
    first, second = RequestIds(), RequestIds()
    ids = [first.next() for _ in range(1000)] + [second.next() for _ in range(1000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in ids)
    assert len(set(ids)) == len(ids)
