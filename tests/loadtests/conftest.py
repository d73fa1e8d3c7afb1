"""The load-test harness runs its own event loops (`asyncio.run` inside `run_compare`)."""

from __future__ import annotations

import asyncio
import warnings

import pytest


@pytest.fixture(autouse=True)
def _close_a_leftover_event_loop() -> None:
    """Close the event loop an earlier async test may have left set as the thread's current
    loop: `asyncio.run` unsets it, and its garbage collection then reports an unclosed
    socket in the middle of this test (a ResourceWarning, an error in this suite)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            loop = asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:
            loop = None
    if loop is not None and not loop.is_running() and not loop.is_closed():
        loop.close()
    asyncio.set_event_loop(None)
