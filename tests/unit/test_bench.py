"""The benchmark's pure parts: bodies, wrk's report, the pacing plan and the summary."""

from __future__ import annotations

import json
from typing import Any

from load_tests.bench_report import render_markdown, summarize
from load_tests.bench_worker import chat_body
from load_tests.bench_wrk import chat_bodies, parse_report, rate_plan


def test_chat_bodies_are_7kb_chats_that_differ_and_repeat_per_seed() -> None:
    """Bodies are ~7 KB chat requests, all different, and the same for the same seed."""
    bodies = chat_bodies(64, 7000, seed=3)
    assert bodies == chat_bodies(64, 7000, seed=3)
    assert len(set(bodies)) == 64
    assert all(6000 < len(body) < 8000 for body in bodies)
    first = json.loads(bodies[0])
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant", "user"]
    assert b"\n" not in b"".join(bodies)  # one body per line in the wrk script's file


def test_instant_worker_reports_cached_tokens_within_prompt() -> None:
    """The instant worker's usage has cached_tokens <= prompt_tokens, as vLLM's does."""
    usage = json.loads(chat_body(7000))["usage"]
    assert usage["prompt_tokens"] == 1750
    assert 0 < usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"]


def test_wrk_report_is_parsed_into_rates_and_percentiles() -> None:
    """The BENCH_JSON line of the Lua script becomes req/s, ms percentiles and error counts."""
    line = (
        'BENCH_JSON {"requests": 5000, "duration_us": 2000000, "bytes": 1, "connect": 0, '
        '"read": 1, "write": 0, "status": 2, "timeout": 0, "mean_us": 150.5, "max_us": 900, '
        '"percentiles_us": {"50": 120, "90": 200, "99": 450, "99.9": 800}}'
    )
    result = parse_report("Running 2s test\n" + line + "\n", connections=4, threads=1)
    assert result.rps == 2500.0
    assert (result.p(50), result.p(99), result.p(99.9)) == (0.12, 0.45, 0.8)
    assert result.error_count == 3


def test_rate_plan_paces_close_to_the_asked_rate() -> None:
    """The connections and whole-millisecond delay chosen offer within 3% of the rate."""
    for rate, latency in ((400.0, 1.5), (2500.0, 0.3), (4500.0, 0.25), (900.0, 0.1)):
        connections, delay = rate_plan(rate, latency)
        offered = connections * 1000.0 / (delay + latency)
        assert abs(offered - rate) / rate <= 0.03, (rate, connections, delay)
        assert delay >= 1
        assert connections >= 2


def _point(p50: float, p99: float, rps: float, cpu: float | None) -> dict[str, Any]:
    return {
        "connections": 1, "rps": rps, "latency_ms": {"50": p50, "99": p99}, "error_count": 0,
        "cpu_s": cpu, "rps_per_cpu_s": None if cpu is None else rps / cpu,
    }  # fmt: skip


def test_summary_subtracts_direct_and_compares_with_the_peer() -> None:
    """Added latency is target minus direct; the per-core ratio is ours over the peer's."""
    targets = [
        {"name": "direct", "kind": "direct", "processes": 1, "meta": {},
         "points": {"c1": _point(0.1, 0.3, 9000, None), "c64": _point(1, 2, 30000, None),
                    "half_peak": _point(0.12, 0.4, 500, None)}},
        {"name": "ours-1p", "kind": "ours", "processes": 1, "meta": {},
         "points": {"c1": _point(0.3, 0.9, 3000, 1.0), "c64": _point(9, 20, 1000, 1.0),
                    "half_peak": _point(0.35, 1.0, 500, 0.5)}},
        {"name": "sglang-router", "kind": "peer", "processes": 1, "meta": {},
         "points": {"c1": _point(0.2, 0.5, 5000, 1.0), "c64": _point(3, 6, 4000, 2.0),
                    "half_peak": _point(0.2, 0.6, 500, 0.2)}},
    ]  # fmt: skip
    meta = {"command": "x", "config": {"duration": 1, "warmup": 0, "workers": 2, "threads": 1},
            "body_bytes_mean": 7000, "half_peak_rps": 500.0,
            "machine": {"cpu_count": 2, "cpu_model": "cpu", "kernel": "k", "python": "3.11",
                        "versions": {}, "wrk": "wrk"}}  # fmt: skip
    result = summarize(targets, meta)
    ours = result["targets"][1]["points"]
    assert ours["half_peak"]["added_ms"] == {"50": 0.23, "99": 0.6}
    assert result["ratios"]["processes_1"]["rps_per_cpu_s_vs_peer"] == 0.5
    verdicts = "\n".join(result["verdicts"])
    assert "p50 0.230 ms (target < 0.3: met)" in verdicts
    assert "ratio 0.5 (target >= 0.5: met)" in verdicts
    assert "| ours-1p | c1 |" in render_markdown(result)
