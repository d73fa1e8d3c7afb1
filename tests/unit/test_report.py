"""The load-test report computed from records (load_tests.report, load_tests.records)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from load_tests.records import (
    DecisionInfo,
    LoadSample,
    RequestRecord,
    RunResult,
    parse_decision,
    read_run,
    write_run,
)
from load_tests.report import (
    PLOT_FILES,
    build_summary,
    loads_from_records,
    percentile,
    render_markdown,
    summarize_run,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _record(
    index: int,
    *,
    worker: str = "w0",
    reason: str = "warm",
    prompt: int = 100,
    cached: int = 50,
    ttft: float = 0.1,
    status: int = 200,
    error: str | None = None,
    started: float = 0.0,
    finished: float = 1.0,
    itl: list[float] | None = None,
) -> RequestRecord:
    return RequestRecord(
        index=index,
        tenant="t00",
        path="/v1/chat/completions",
        stream=itl is not None,
        scheduled=started,
        started=started,
        finished=finished,
        status=status,
        error=error,
        worker=worker,
        decision=DecisionInfo(reason=reason, policy="cache_aware", matched=1, best=1),
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=10,
        ttft=ttft,
        itl=itl or [],
        latency=finished - started,
    )


def _run(label: str, cached: int) -> RunResult:
    records = [
        _record(i, worker=f"w{i % 2}", cached=cached, ttft=0.01 * (i + 1), started=i * 0.5,
                finished=i * 0.5 + 1.0, itl=[0.01, 0.02], reason="spill" if i == 0 else "warm")
        for i in range(10)
    ]  # fmt: skip
    records.append(_record(10, status=502, error="http 502: bad gateway", cached=0))
    samples = [LoadSample(t * 0.25, {"w0": t % 3, "w1": 1}) for t in range(20)]
    return RunResult(label, records, samples, {"policy": label}, elapsed=6.0)


def test_percentile_interpolates_between_ranks() -> None:
    """Percentiles match the linear-interpolation definition on a known sample."""
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 5.0
    assert percentile(values, 25) == 2.0
    assert percentile([10.0, 20.0], 95) == pytest.approx(19.5)
    assert percentile([], 50) is None


def test_summary_figures_add_up_against_the_records() -> None:
    """Ratios, percentiles and counts in the summary are what the records say."""
    run = _run("cache_aware", cached=60)
    summary = summarize_run(run)
    ok = [r for r in run.records if r.ok]
    assert summary["requests"] == 11
    assert summary["ok"] == 10
    assert summary["errors"] == 1
    assert summary["error_kinds"] == {"http 502": 1}
    # The failed request's tokens do not count.
    assert summary["prompt_tokens"] == sum(r.prompt_tokens or 0 for r in ok) == 1000
    assert summary["cached_tokens"] == 600
    assert summary["cached_token_ratio"] == pytest.approx(0.6)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    p50, p99 = percentile(ttfts, 50), percentile(ttfts, 99)
    assert p50 is not None
    assert p99 is not None
    # The 10 successes have TTFTs 10, 20, ..., 100 ms; the failure's is left out.
    assert summary["ttft_ms"]["p50"] == pytest.approx(1000 * p50) == pytest.approx(55.0)
    assert summary["ttft_ms"]["p99"] == pytest.approx(1000 * p99) == pytest.approx(99.1)
    assert summary["itl_ms"]["p50"] == pytest.approx(15.0)
    assert summary["spill_rate"] == pytest.approx(1 / 11)
    assert summary["decisions"] == {"spill": 1, "warm": 10}
    assert sum(w["requests"] for w in summary["workers"].values()) == 11
    assert summary["workers"]["w0"]["requests"] == 6
    assert summary["workers"]["w0"]["load_max"] == 2
    assert summary["workers"]["w1"]["load_mean"] == pytest.approx(1.0)
    assert summary["load_source"] == "admin"
    # 10 successes between the first send (0.0) and the last answer (5.5).
    assert summary["throughput_rps"] == pytest.approx(10 / 5.5, rel=1e-3)


def test_comparison_is_candidate_over_baseline() -> None:
    """The comparison holds cache_aware/round_robin for cached ratio and p50 TTFT."""
    summary = build_summary([_run("round_robin", 25), _run("cache_aware", 75)], {"seed": 1})
    comparison = summary["comparison"]
    assert comparison["cached_token_ratio_gain"] == pytest.approx(3.0)
    assert comparison["ttft_p50_ratio"] == pytest.approx(1.0)
    assert comparison["targets"]["cached_token_ratio_gain_met"] is True
    assert comparison["targets"]["ttft_p50_lower_met"] is False
    assert build_summary([_run("cache_aware", 75)], {})["comparison"] is None


def test_a_run_where_everything_failed_still_summarises() -> None:
    """A run with only failures reports them and no ratios instead of crashing."""
    run = RunResult("round_robin", [_record(0, status=0, error="ConnectError: refused")])
    summary = summarize_run(run)
    assert summary["errors"] == 1
    assert summary["cached_token_ratio"] is None
    assert summary["ttft_ms"]["p50"] is None
    assert "round_robin" in render_markdown(build_summary([run], {}))


def test_loads_are_reconstructed_from_records_without_samples() -> None:
    """Without admin samples, in-flight counts per worker come from start/finish times."""
    records = [
        _record(0, worker="w0", started=0.0, finished=1.0),
        _record(1, worker="w0", started=0.5, finished=1.5),
        _record(2, worker="w1", started=0.0, finished=0.3),
    ]
    samples = loads_from_records(records, step=0.25)
    at = {s.t: s.inflight for s in samples}
    assert at[0.0] == {"w0": 1, "w1": 1}
    assert at[0.5] == {"w0": 2, "w1": 0}
    assert at[1.25] == {"w0": 1, "w1": 0}
    summary = summarize_run(RunResult("x", records))
    assert summary["load_source"] == "records"
    assert summary["workers"]["w0"]["load_max"] == 2


def test_report_files_are_written(tmp_path: Path) -> None:
    """write_report leaves summary.json, report.md and three PNG plots in the out dir."""
    runs = [_run("round_robin", 25), _run("cache_aware", 75)]
    summary = write_report(tmp_path / "out", runs, {"seed": 7, "duration": 5})
    out = tmp_path / "out"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["comparison"]["cached_token_ratio_gain"] == pytest.approx(3.0)
    assert on_disk["policies"]["round_robin"]["errors"] == 1
    assert on_disk == json.loads(json.dumps(summary))
    markdown = (out / "report.md").read_text()
    assert "| round_robin |" in markdown
    assert "cache_aware/round_robin" in markdown
    assert "**seed**: 7" in markdown
    for name in PLOT_FILES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 5000
        assert f"]({name})" in markdown


def test_decision_header_is_parsed() -> None:
    """The router's decision header yields reason and numbers; `cap=-` means no cap."""
    header = "spill; policy=cache_aware; matched=3; best=12; blocks=40; load=2; cap=-"
    decision = parse_decision(header)
    assert decision == DecisionInfo("spill", "cache_aware", 3, 12, 40, 2, None)
    assert parse_decision("warm; policy=cache_aware; cap=5") == DecisionInfo(
        "warm", "cache_aware", cap=5
    )
    assert parse_decision(None) is None
    assert parse_decision("") is None


@pytest.mark.parametrize("name", ["run.jsonl", "run.jsonl.gz"])
def test_run_records_round_trip_through_a_file(tmp_path: Path, name: str) -> None:
    """A run written and read back yields the same report."""
    run = _run("cache_aware", 60)
    again = read_run(write_run(tmp_path / name, run))
    assert again.label == run.label
    assert again.meta == run.meta
    assert again.records == run.records
    assert again.load_samples == run.load_samples
    assert summarize_run(again) == summarize_run(run)
