"""`python -m load_tests compare` and `run`: one scenario's trace through several routers.

``compare`` brings the whole stack up on loopback for each target in turn (fresh simulated
workers, our router in each policy, the peer routers in theirs), drives the same trace
through it, applies the scenario's churn, tears it down, and writes one report for all:
``summary.json``, ``report.md`` and PNG plots. ``run`` drives a scenario's trace against a
router that is already running (any OpenAI-compatible endpoint) and writes the same report
for that one target.

Next to what each router reached, the report prints what it could have reached
(`load_tests.oracle`): the oracle bound for this trace and this cluster's cache, and for
each run the prompt tokens that were warm somewhere vs where the request went.
"""

from __future__ import annotations

import asyncio
import json
import platform
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from load_tests.client import RunOptions, run_trace
from load_tests.oracle import CacheGeometry, PromptBuilder, hit_shares, oracle_bound
from load_tests.records import RunResult, write_run
from load_tests.report import (
    _fmt,
    _pct,
    build_summary,
    comparison_table,
    percentile,
    render_markdown,
    write_plots,
)
from load_tests.scenarios import Scenario
from load_tests.stack import OURS, Stack, Target
from load_tests.workload import Trace, TraceRequest, summarize_trace, write_trace

OUR_POLICIES = ("round_robin", "least_loaded", "cache_aware")
PEER_ROUTERS = ("sglang-router", "vllm-router")
PEER_POLICIES = ("cache_aware", "round_robin")
CANDIDATE = "cache_aware"
ORACLE_FRACTION_TARGET = 0.95


TUNABLE = (
    "load_factor",
    "load_floor",
    "min_match_blocks",
    "min_match_ratio",
    "affinity_blocks",
    "affinity_choices",
)


def parse_tuning(text: str) -> tuple[tuple[str, float], ...]:
    """``load_factor=2,min_match_blocks=1`` -> sorted pairs (ValueError names a bad part)."""
    pairs: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in TUNABLE:
            raise ValueError(f"bad tuning {part!r}: use NAME=VALUE with NAME in {TUNABLE}")
        number = float(value)
        pairs[name] = number if name in ("load_factor", "min_match_ratio") else int(number)
    return tuple(sorted(pairs.items()))


def targets_for(
    policies: Sequence[str], peers: Sequence[str], tunings: Sequence[str] = ()
) -> list[Target]:
    """Our router in each of ``policies``, cache_aware once per extra tuning, then each peer
    router in each of its policies."""
    targets = [Target(OURS, p) for p in policies]
    targets += [Target(OURS, CANDIDATE, parse_tuning(t)) for t in tunings]
    targets += [Target(peer, p) for peer in peers for p in PEER_POLICIES]
    return targets


def geometry_of(scenario: Scenario) -> CacheGeometry:
    """The cluster's cache at its largest (spare workers included: churn may add them)."""
    return CacheGeometry(
        scenario.workers + scenario.spare_workers,
        scenario.cache_blocks,
        scenario.block_size,
        scenario.workload.model,
    )


def _sent(trace: Trace, duration: float) -> list[TraceRequest]:
    return [r for r in trace.requests if r.offset < duration]


async def _drive(
    stack: Stack, trace: Trace, label: str, options: RunOptions, console: Console
) -> RunResult:
    started = asyncio.Event()
    churn = asyncio.create_task(stack.drive_churn(started))
    started.set()
    try:
        run = await run_trace(
            trace.requests, stack.router_urls, label=label, options=options, console=console
        )
    finally:
        churn.cancel()
        await asyncio.gather(churn, return_exceptions=True)
    insights = await stack.insights()
    if insights is not None:
        run.meta["insights"] = insights
    return run


def run_target(
    scenario: Scenario,
    target: Target,
    trace: Trace,
    *,
    logs: Path,
    console: Console,
) -> RunResult:
    """One target's stack up, the trace through it (with churn), everything down."""
    console.rule(f"[bold]{scenario.name}: {target.label}")
    options = RunOptions(
        concurrency=scenario.concurrency, duration=scenario.duration, drain_timeout=15.0
    )
    with Stack(scenario, target, api_keys=trace.tenants, logs=logs, console=console) as stack:
        run = asyncio.run(_drive(stack, trace, target.label, options, console))
        run.meta.update(
            {
                "router": target.router,
                "policy": target.policy,
                "replicas": len(stack.router_urls),
                "workers": {wid: sim.url for wid, sim in stack.sims.items()},
                "processes": [p for p in stack.processes if "pid" in p],
                "churn": stack.churn_log,
            }
        )
    return run


def by_version(run: RunResult) -> dict[str, dict[str, Any]]:
    """Cached-token ratio per prefix version, and per version over time (5 equal windows)."""
    ok = [r for r in run.records if r.ok and r.prompt_tokens]
    if not ok:
        return {}
    end = max(r.started for r in ok) or 1.0
    groups: dict[int, list[Any]] = defaultdict(list)
    for r in ok:
        groups[r.prefix_version].append(r)
    out: dict[str, dict[str, Any]] = {}
    for version, records in sorted(groups.items()):
        prompt = sum(r.prompt_tokens or 0 for r in records)
        cached = sum(r.cached_tokens or 0 for r in records)
        windows: list[float | None] = []
        for k in range(5):
            lo, hi = k * end / 5, (k + 1) * end / 5
            part = [r for r in records if lo <= r.started < hi or (k == 4 and r.started == end)]
            p = sum(r.prompt_tokens or 0 for r in part)
            windows.append(round(sum(r.cached_tokens or 0 for r in part) / p, 4) if p else None)
        out[f"v{version}"] = {
            "requests": len(records),
            "cached_token_ratio": round(cached / prompt, 6) if prompt else None,
            "ratio_by_fifth": windows,
        }
    return out


def enrich(
    summary: dict[str, Any],
    runs: Sequence[RunResult],
    trace: Trace,
    scenario: Scenario,
) -> dict[str, Any]:
    """Add the oracle bound, hit available vs captured, per-version figures and the
    comparisons of cache_aware against every other run to ``summary`` (in place)."""
    geometry = geometry_of(scenario)
    builder = PromptBuilder(geometry)
    requests = _sent(trace, scenario.duration)
    bound = oracle_bound(requests, geometry, builder)
    oracle = bound.pooled_ratio
    summary["oracle"] = {
        **bound.to_json(),
        "cluster_cache_blocks": geometry.cluster_blocks,
        "definition": "one cache as large as the cluster's with offline-optimal (Belady) "
        "eviction; unbounded: an infinite cache",
    }
    for run in runs:
        figures = summary["policies"][run.label]
        ratio = figures["cached_token_ratio"]
        figures["oracle_fraction"] = round(ratio / oracle, 4) if ratio and oracle else None
        figures["hits"] = hit_shares(requests, run.records, geometry, builder).to_json()
        figures["by_prefix_version"] = by_version(run)
        figures["ttft_ms_hit_vs_miss"] = _ttft_hit_vs_miss(run)
    summary["comparisons"] = _comparisons(summary["policies"])
    return summary


def _ttft_hit_vs_miss(run: RunResult) -> dict[str, float | None]:
    """p50 TTFT of requests with at least half their prompt cached vs the rest."""
    ok = [r for r in run.records if r.ok and r.ttft is not None and r.prompt_tokens]
    hits = [r.ttft for r in ok if (r.cached_tokens or 0) * 2 >= (r.prompt_tokens or 1)]
    misses = [r.ttft for r in ok if (r.cached_tokens or 0) * 2 < (r.prompt_tokens or 1)]
    p_hit, p_miss = percentile([t for t in hits if t], 50), percentile([t for t in misses if t], 50)
    return {
        "hit_p50": None if p_hit is None else round(p_hit * 1000, 3),
        "miss_p50": None if p_miss is None else round(p_miss * 1000, 3),
    }


def _comparisons(policies: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """cache_aware against every other run: ratio of cached-token ratios and of p99 TTFT."""
    if CANDIDATE not in policies:
        return {}
    cand = policies[CANDIDATE]
    out: dict[str, Any] = {}
    for name, other in policies.items():
        if name == CANDIDATE:
            continue
        ratio = other["cached_token_ratio"]
        p99 = other["ttft_ms"]["p99"]
        out[name] = {
            "cached_token_ratio_gain": (
                round(cand["cached_token_ratio"] / ratio, 4)
                if ratio and cand["cached_token_ratio"]
                else None
            ),
            "ttft_p99_ratio": (
                round(cand["ttft_ms"]["p99"] / p99, 4) if p99 and cand["ttft_ms"]["p99"] else None
            ),
        }
    return out


def render_bounds_markdown(summary: Mapping[str, Any]) -> str:
    """The report's section on the oracle bound, hits and the comparisons."""
    oracle = summary.get("oracle")
    if not oracle:
        return ""
    lines = ["", "## Against the oracle bound", ""]
    lines.append(
        f"Oracle bound (one cache of {oracle['cluster_cache_blocks']} blocks, the cluster's, "
        f"evicted optimally): **{_pct(oracle['cached_token_ratio'])}**; infinite cache: "
        f"{_pct(oracle['unbounded_cached_token_ratio'])}."
    )
    lines += ["", "| run | cached-token ratio | of oracle | warm anywhere (model) | "
              "captured (model) | captured / available | TTFT p50 hit ms | miss ms | "
              "busiest worker's mean load / mean |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, p in summary["policies"].items():
        hits = p.get("hits") or {}
        hm = p.get("ttft_ms_hit_vs_miss") or {}
        lines.append(
            f"| {name} | {_pct(p['cached_token_ratio'])} | {_fmt(p.get('oracle_fraction'), 3)} | "
            f"{_pct(hits.get('available_ratio'))} | {_pct(hits.get('captured_ratio'))} | "
            f"{_fmt(hits.get('captured_over_available'), 3)} | {_fmt(hm.get('hit_p50'))} | "
            f"{_fmt(hm.get('miss_p50'))} | {_fmt(p.get('load_peak_mean_over_mean'), 2)} |"
        )
    leaky = [
        name
        for name, p in summary["policies"].items()
        if (p.get("cached_tokens") or 0) > oracle["pooled_cached_tokens"]
    ]
    if leaky:
        lines += ["", f"**Above the tenant-isolated bound: {', '.join(leaky)}.** Their workers "
                  "reused blocks across tenants (or salts): the router did not pass each "
                  "tenant's `cache_salt` on, so the hit rate is not comparable and the tenants "
                  "are not isolated."]  # fmt: skip
    comparisons = summary.get("comparisons") or {}
    if comparisons:
        lines += ["", f"## {CANDIDATE} against every other run", ""]
        lines += ["| other | cached-token ratio, ours / theirs | p99 TTFT, ours / theirs |",
                  "|---|---:|---:|"]  # fmt: skip
        for name, c in comparisons.items():
            lines.append(
                f"| {name} | {_fmt(c['cached_token_ratio_gain'], 3)} | "
                f"{_fmt(c['ttft_p99_ratio'], 3)} |"
            )
    versions = {
        name: p["by_prefix_version"]
        for name, p in summary["policies"].items()
        if len(p.get("by_prefix_version") or {}) > 1
    }
    if versions:
        lines += ["", "## By prefix version", ""]
        lines.append(
            "Cached-token ratio per version, whole run and per fifth of the run "
            "(a rollout's warmup shows as low early fifths of the new version)."
        )
        lines += ["", "| run | version | requests | ratio | by fifth |", "|---|---|---:|---:|---|"]
        for name, table in versions.items():
            for version, v in table.items():
                fifths = " / ".join(_pct(x) for x in v["ratio_by_fifth"])
                lines.append(
                    f"| {name} | {version} | {v['requests']} | "
                    f"{_pct(v['cached_token_ratio'])} | {fifths} |"
                )
    return "\n".join(lines) + "\n"


def write_compare_report(
    out: Path,
    runs: Sequence[RunResult],
    trace: Trace,
    scenario: Scenario,
    meta: Mapping[str, Any],
    extra_markdown: str = "",
) -> dict[str, Any]:
    """``summary.json``, ``report.md`` and the plots for a scenario's runs."""
    out.mkdir(parents=True, exist_ok=True)
    summary = build_summary(runs, meta)
    enrich(summary, runs, trace, scenario)
    plots = write_plots(out, runs, summary)
    summary["files"] = {
        "summary": "summary.json",
        "report": "report.md",
        "plots": [p.name for p in plots],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    markdown = render_markdown(summary, [p.name for p in plots])
    markdown = markdown.replace(
        "# prefix-router load report", f"# prefix-router load report: {scenario.name}", 1
    )
    (out / "report.md").write_text(
        markdown + render_bounds_markdown(summary) + _insights_markdown(runs) + extra_markdown,
        encoding="utf-8",
    )
    return summary


def _insights_markdown(runs: Sequence[RunResult]) -> str:
    """The router's own insights (prompt shape, versions, savings) after the candidate's run."""
    from load_tests.insights_report import render_insights_markdown

    for run in runs:
        insights = run.meta.get("insights")
        if run.label == CANDIDATE and isinstance(insights, dict):
            section = render_insights_markdown(insights)
            note = f"_From `GET /admin/insights` of our router after the {run.label} run._"
            return f"\n{section.rstrip()}\n\n{note}\n"
    return ""


def run_compare(
    scenario: Scenario,
    targets: Sequence[Target],
    out: Path,
    console: Console | None = None,
) -> dict[str, Any]:
    """Every target on the scenario's trace; the report in ``out``; returns the summary."""
    console = console or Console()
    began = time.monotonic()
    logs, runs_dir = out / "logs", out / "runs"
    for directory in (out, logs, runs_dir):
        directory.mkdir(parents=True, exist_ok=True)
    trace = scenario.trace()
    write_trace(out / "trace.jsonl.gz", trace)
    console.print(
        f"scenario {scenario.name}: {scenario.summary}; {len(trace.requests)} requests, "
        f"{scenario.workers} workers x {scenario.cache_blocks} blocks; "
        f"targets: {', '.join(t.label for t in targets)}",
        highlight=False,
        markup=False,
    )
    runs: list[RunResult] = []
    failed: dict[str, str] = {}
    for target in targets:
        try:
            run = run_target(scenario, target, trace, logs=logs, console=console)
        except Exception as exc:  # a peer that cannot start must not sink the comparison
            failed[target.label] = f"{type(exc).__name__}: {exc}"[:300]
            console.print(f"[red]{target.label} did not run:[/] {failed[target.label]}")
            continue
        write_run(runs_dir / f"{target.label.replace('/', '-')}.jsonl.gz", run)
        runs.append(run)
    trace_summary = summarize_trace(_sent(trace, scenario.duration))
    trace_summary.pop("by_tenant", None)
    meta = {
        "command": "python -m load_tests compare",
        "scenario": scenario.describe(),
        "trace": trace_summary,
        "targets": [t.label for t in targets],
        "not_run": failed,
        "elapsed_s": round(time.monotonic() - began, 2),
        "python": platform.python_version(),
        "logs": str(logs),
    }
    summary = write_compare_report(out, runs, trace, scenario, meta)
    console.print(comparison_table(summary))
    console.print(
        f"oracle bound {_pct(summary['oracle']['cached_token_ratio'])}; "
        f"report: {out / 'report.md'}",
        highlight=False,
        markup=False,
    )
    return summary


def run_against(
    scenario: Scenario,
    target_url: str,
    out: Path,
    *,
    admin_token: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """``run``: the scenario's trace against a router already running at ``target_url``.

    Its workers must accept the trace's API keys (see ``trace.jsonl.gz`` in ``out``) and
    serve the trace's model; churn events are not applied (the harness does not own them).
    """
    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    trace = scenario.trace()
    write_trace(out / "trace.jsonl.gz", trace)
    options = RunOptions(
        concurrency=scenario.concurrency,
        duration=scenario.duration,
        admin_token=admin_token,
        drain_timeout=15.0,
    )
    label = "target"
    run = asyncio.run(
        run_trace(trace.requests, target_url, label=label, options=options, console=console)
    )
    write_run(out / "run.jsonl.gz", run)
    meta = {
        "command": "python -m load_tests run",
        "target": target_url,
        "scenario": scenario.describe(),
        "python": platform.python_version(),
    }
    summary = write_compare_report(out, [run], trace, scenario, meta)
    console.print(comparison_table(summary))
    console.print(f"report: {out / 'report.md'}", highlight=False, markup=False)
    return summary
