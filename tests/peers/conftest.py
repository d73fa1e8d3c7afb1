"""Fixtures for the peer-router tier: two simulators, and each peer installed or skipped.

A peer that cannot be installed because the package index is unreachable skips its tests;
any other install failure fails them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from load_tests import procs
from load_tests.peers import PeerUnavailable, ensure_peer


@pytest.fixture(scope="session")
def peer_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("peers")


@pytest.fixture(scope="session")
def sims(peer_logs: Path) -> Iterator[list[procs.ServerProcess]]:
    """Two simulators (w0, w1) for the whole session."""
    sim = [*procs.console_script("prefix-worker"), "sim", "--port", "0"]
    specs = [
        (
            f"w{i}",
            [*sim, "--worker-id", f"w{i}", "--decode-ms-per-token", "0.5"],
            peer_logs / f"w{i}.log",
        )
        for i in range(2)
    ]
    started = procs.start_many(specs, timeout=30)
    try:
        yield started
    finally:
        for server in started:
            server.stop()


def installed(name: str) -> None:
    """Install ``name`` (cached after the first time); skip only when PyPI is unreachable."""
    try:
        ensure_peer(name)
    except PeerUnavailable as exc:
        if exc.network:
            pytest.skip(f"{name} cannot be installed: the package index is unreachable ({exc})")
        raise
