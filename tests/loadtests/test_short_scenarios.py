"""Each scenario's short form through the whole compare harness: real simulated workers and
router processes on loopback. These check the harness (bounds hold, counts add up, the
report is written), not the router's performance; `python -m load_tests compare` measures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from load_tests.compare import run_compare
from load_tests.scenarios import SCENARIOS, get_scenario
from load_tests.stack import OURS, Target

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_short_scenario_report_is_complete_and_consistent(name: str, tmp_path: Path) -> None:
    """The report is written, every request is accounted for, and no run beats the bound."""
    scenario = get_scenario(name).short()
    with (tmp_path / "console.txt").open("w") as log:
        console = Console(file=log, width=120)
        summary = run_compare(scenario, [Target(OURS, "cache_aware")], tmp_path, console)

    for file in ("summary.json", "report.md", "trace.jsonl.gz", *summary["files"]["plots"]):
        assert (tmp_path / file).stat().st_size > 0, file
    assert json.loads((tmp_path / "summary.json").read_text())["oracle"] == summary["oracle"]
    assert summary["meta"]["not_run"] == {}

    run = summary["policies"]["cache_aware"]
    sent = summary["meta"]["trace"]["requests"]
    assert run["requests"] == sent == summary["oracle"]["requests"]
    assert run["ok"] + run["errors"] == run["requests"]
    assert sum(w["requests"] for w in run["workers"].values()) >= run["ok"]
    assert run["hits"]["requests"] == run["ok"]
    assert run["hits"]["captured_tokens"] <= run["hits"]["available_tokens"]

    oracle = summary["oracle"]
    assert oracle["pooled_cached_tokens"] <= oracle["unbounded_cached_tokens"]
    assert run["cached_tokens"] <= oracle["pooled_cached_tokens"]
    assert run["cached_tokens"] <= run["prompt_tokens"]
    # Worker churn kills a worker on purpose; elsewhere nothing may fail.
    if not scenario.churn:
        assert run["errors"] == 0, run["error_kinds"]
    else:
        assert [e["outcome"] for e in run["run"]["churn"]] == ["ok"] * len(scenario.churn)
    if scenario.replicas > 1:
        assert run["run"]["replicas"] == scenario.replicas
    report = (tmp_path / "report.md").read_text()
    assert "## Against the oracle bound" in report
