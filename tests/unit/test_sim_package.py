"""The simulator stays an independent oracle with a deliberate public surface."""

from __future__ import annotations

import ast
from pathlib import Path

import worker.sim

SIM = Path(__file__).resolve().parents[2] / "worker" / "sim"


def test_simulator_imports_nothing_from_router() -> None:
    """No module under worker/sim imports router, so router-vs-worker tests prove something.

    (The KV-event sidecar in worker/kv_events is not the oracle: it writes the router's index.)
    """
    offenders: list[str] = []
    for path in SIM.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path}: {n}" for n in names if n.split(".")[0] == "router"]
    assert offenders == []


def test_public_names_are_exactly_the_intended_ones() -> None:
    """worker.sim re-exports the app factory, config, state key and the cache-event seam."""
    assert set(worker.sim.__all__) == {
        "SIM_STATE",
        "AllBlocksCleared",
        "BlockRemoved",
        "BlockStored",
        "CacheEvent",
        "CacheListener",
        "PrefixCache",
        "SimConfig",
        "SimState",
        "create_app",
    }
    assert all(hasattr(worker.sim, name) for name in worker.sim.__all__)
