"""The load-test report: figures per run from its records, then JSON, Markdown and plots.

Everything is computed from `RunResult` records alone (never from the live system), so a
report can be rebuilt from saved run files and any target that yields records (our router
under each policy, a peer router, an offline replay) is measured the same way.

Definitions (per run):
- cached-token ratio: sum of ``cached_tokens`` / sum of ``prompt_tokens`` over successful
  requests (the share of prompt tokens whose KV state was reused);
- TTFT: time to the first content chunk (streaming) or to the whole response (non-streaming);
  inter-token latency: gaps between consecutive content chunks of streaming responses;
- percentiles: linear interpolation between closest ranks (numpy's default);
- throughput: successful requests (and completion tokens) per second between the first send
  and the last answer;
- spill rate: requests whose routing decision was ``spill`` / all requests;
- per-worker load: in-flight requests per worker over time, from the router's admin samples
  when present, else reconstructed from the records' start and finish times.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from load_tests.records import NOT_SENT, LoadSample, RequestRecord, RunResult

BASELINE = "round_robin"
CANDIDATE = "cache_aware"
TARGET_CACHED_RATIO_GAIN = 1.5
PLOT_FILES = ("cached_ratio.png", "ttft.png", "worker_load.png")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation; None for no values."""
    return percentile_of_sorted(sorted(values), q)


def percentile_of_sorted(ordered: Sequence[float], q: float) -> float | None:
    """`percentile` of values already in ascending order (no copy, no sort)."""
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 3)


def loads_from_records(records: Sequence[RequestRecord], step: float = 0.25) -> list[LoadSample]:
    """In-flight requests per worker every ``step`` seconds, from record start/finish times.

    A request counts as in flight at time t when ``started <= t < finished``.
    """
    events = sorted(
        [(r.started, 1, r.worker) for r in records if r.worker is not None]
        + [(r.finished, -1, r.worker) for r in records if r.worker is not None]
    )
    if not events:
        return []
    counts = dict.fromkeys(sorted({w for _, _, w in events}), 0)
    samples = []
    cursor = 0
    t = 0.0
    end = events[-1][0]
    while t <= end:
        while cursor < len(events) and events[cursor][0] <= t:
            _, delta, worker = events[cursor]
            counts[worker] += delta
            cursor += 1
        samples.append(LoadSample(round(t, 4), dict(counts)))
        t += step
    return samples


def worker_loads(samples: Sequence[LoadSample]) -> dict[str, dict[str, float]]:
    """Per worker: max and mean in-flight over the samples (a worker absent from one is 0)."""
    workers = sorted({w for s in samples for w in s.inflight})
    out: dict[str, dict[str, float]] = {}
    for worker in workers:
        values = [s.inflight.get(worker, 0) for s in samples]
        out[worker] = {"max": max(values), "mean": round(sum(values) / len(values), 4)}
    return out


def summarize_run(run: RunResult) -> dict[str, Any]:
    """The figures for one run (see the module docstring for definitions)."""
    records = run.records
    ok = [r for r in records if r.ok]
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    completion = sum(r.completion_tokens or 0 for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.itl]
    latencies = [r.latency for r in ok if r.latency is not None]
    lags = [r.started - r.scheduled for r in records if r.error != NOT_SENT]
    span = (max(r.finished for r in ok) - min(r.started for r in ok)) if ok else 0.0
    decisions = Counter(r.decision.reason for r in records if r.decision is not None)
    errors = Counter((r.error or f"http {r.status}").split(":")[0] for r in records if not r.ok)
    per_worker_requests = Counter(r.worker for r in records if r.worker is not None)
    samples = run.load_samples
    load_source = "admin" if samples else "records"
    if not samples:
        samples = loads_from_records(records)
    loads = worker_loads(samples)
    workers = {
        w: {
            "requests": per_worker_requests.get(w, 0),
            "load_max": loads.get(w, {}).get("max", 0),
            "load_mean": loads.get(w, {}).get("mean", 0.0),
        }
        for w in sorted(set(per_worker_requests) | set(loads))
    }
    means = [w["load_mean"] for w in workers.values()]
    mean_of_means = sum(means) / len(means) if means else 0.0
    return {
        "run": run.meta,
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "error_kinds": dict(errors.most_common(5)),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "completion_tokens": completion,
        "cached_token_ratio": round(cached / prompt, 6) if prompt else None,
        "ttft_ms": {f"p{q}": _ms(percentile(ttfts, q)) for q in (50, 95, 99)},
        "itl_ms": {f"p{q}": _ms(percentile(gaps, q)) for q in (50, 99)},
        "latency_ms": {f"p{q}": _ms(percentile(latencies, q)) for q in (50, 99)},
        "send_lag_ms_p99": _ms(percentile(lags, 99)),
        "span_s": round(span, 3),
        "throughput_rps": round(len(ok) / span, 3) if span > 0 else None,
        "output_tokens_per_s": round(completion / span, 3) if span > 0 else None,
        "spill_rate": round(decisions.get("spill", 0) / len(records), 6) if records else None,
        "decisions": dict(sorted(decisions.items())),
        "workers": workers,
        "load_source": load_source,
        "load_max": max((w["load_max"] for w in workers.values()), default=0),
        "load_mean": round(mean_of_means, 4),
        "load_peak_mean_over_mean": (
            round(max(means) / mean_of_means, 4) if mean_of_means > 0 else None
        ),
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 4)


def compare(
    policies: Mapping[str, Mapping[str, Any]],
    baseline: str = BASELINE,
    candidate: str = CANDIDATE,
) -> dict[str, Any] | None:
    """``candidate`` / ``baseline`` for the cached-token ratio and p50 TTFT (None if absent)."""
    if baseline not in policies or candidate not in policies:
        return None
    base, cand = policies[baseline], policies[candidate]
    gain = _ratio(cand["cached_token_ratio"], base["cached_token_ratio"])
    ttft = _ratio(cand["ttft_ms"]["p50"], base["ttft_ms"]["p50"])
    return {
        "baseline": baseline,
        "candidate": candidate,
        "cached_token_ratio_gain": gain,
        "ttft_p50_ratio": ttft,
        "targets": {
            "cached_token_ratio_gain_min": TARGET_CACHED_RATIO_GAIN,
            "cached_token_ratio_gain_met": gain is not None and gain >= TARGET_CACHED_RATIO_GAIN,
            "ttft_p50_lower_met": ttft is not None and ttft < 1.0,
        },
    }


def build_summary(runs: Sequence[RunResult], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The whole ``summary.json`` object: what ran, per-run figures, and the comparison."""
    policies = {run.label: summarize_run(run) for run in runs}
    return {"meta": dict(meta), "policies": policies, "comparison": compare(policies)}


# --- rendering ------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}%"


_COLUMNS = (
    "policy", "requests", "errors", "cached-token ratio", "TTFT p50 ms", "TTFT p95 ms",
    "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "req/s", "spill rate", "load max", "load mean",
)  # fmt: skip


def table_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    """One row of formatted figures per run, in `_COLUMNS` order."""
    rows = []
    for name, p in summary["policies"].items():
        rows.append([
            name, str(p["requests"]), str(p["errors"]), _pct(p["cached_token_ratio"]),
            _fmt(p["ttft_ms"]["p50"]), _fmt(p["ttft_ms"]["p95"]), _fmt(p["ttft_ms"]["p99"]),
            _fmt(p["itl_ms"]["p50"], 2), _fmt(p["itl_ms"]["p99"], 2),
            _fmt(p["throughput_rps"]), _pct(p["spill_rate"]), _fmt(p["load_max"]),
            _fmt(p["load_mean"], 2),
        ])  # fmt: skip
    return rows


def comparison_table(summary: Mapping[str, Any]) -> Table:
    """A rich table for the terminal: one row per figure, one column per run (narrow enough
    for an 80-column CI log however many figures there are)."""
    names = list(summary["policies"])
    rows = table_rows(summary)
    table = Table(title="prefix-router: policies on the same trace")
    table.add_column("figure")
    for name in names:
        table.add_column(name, justify="right")
    for i, column in enumerate(_COLUMNS[1:], start=1):
        table.add_row(column, *(row[i] for row in rows))
    comparison = summary.get("comparison")
    if comparison:
        table.caption = (
            f"{comparison['candidate']}/{comparison['baseline']}: cached-token ratio "
            f"x{_fmt(comparison['cached_token_ratio_gain'], 2)}, "
            f"p50 TTFT x{_fmt(comparison['ttft_p50_ratio'], 2)}"
        )
    return table


def _plain(value: Any) -> str:
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def render_markdown(summary: Mapping[str, Any], plots: Sequence[str] = PLOT_FILES) -> str:
    """``report.md``: what ran, the comparison table, the ratios, per-worker detail, plots."""
    meta = summary["meta"]
    lines = ["# prefix-router load report", ""]
    lines += ["## What ran", ""]
    for key, value in meta.items():
        if isinstance(value, dict):
            lines.append(f"- **{key}**:")
            lines += [f"  - {k}: {_plain(v)}" for k, v in value.items()]
        else:
            lines.append(f"- **{key}**: {_plain(value)}")
    for name, p in summary["policies"].items():
        processes = p.get("run", {}).get("processes", ())
        if processes:
            started = ", ".join(f"`{proc['name']}` (pid {proc['pid']})" for proc in processes)
            logs = sorted({str(Path(proc["log"]).parent) for proc in processes})
            lines.append(f"- **{name} processes**: {started}; stderr in {', '.join(logs)}")
    lines += ["", "## Results", ""]
    lines.append("| " + " | ".join(_COLUMNS) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(_COLUMNS) - 1)) + "|")
    for row in table_rows(summary):
        lines.append("| " + " | ".join(row) + " |")
    comparison = summary.get("comparison")
    if comparison:
        targets = comparison["targets"]
        gain_ok = "met" if targets["cached_token_ratio_gain_met"] else "NOT met"
        ttft_ok = "met" if targets["ttft_p50_lower_met"] else "NOT met"
        cand, base = comparison["candidate"], comparison["baseline"]
        lines += ["", f"## {cand} vs {base}", ""]
        gain = _fmt(comparison["cached_token_ratio_gain"], 2)
        lines.append(
            f"- cached-token ratio, {cand}/{base}: **{gain}**"
            f" (target >= {targets['cached_token_ratio_gain_min']}: {gain_ok})"
        )
        lines.append(
            f"- p50 TTFT, {cand}/{base}: **{_fmt(comparison['ttft_p50_ratio'], 2)}**"
            f" (target < 1: {ttft_ok})"
        )
    lines += ["", "## Per worker", ""]
    lines.append("| policy | worker | requests | load max | load mean |")
    lines.append("|---|---|---:|---:|---:|")
    for name, p in summary["policies"].items():
        for worker, w in p["workers"].items():
            lines.append(
                f"| {name} | {worker} | {w['requests']} | {w['load_max']} | "
                f"{_fmt(w['load_mean'], 2)} |"
            )
    lines += ["", "## Routing decisions and errors", ""]
    for name, p in summary["policies"].items():
        decisions = ", ".join(f"{k} {v}" for k, v in p["decisions"].items()) or "none reported"
        errors = ", ".join(f"{k} {v}" for k, v in p["error_kinds"].items()) or "none"
        lines.append(f"- **{name}**: decisions: {decisions}; errors: {errors}")
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def write_plots(out_dir: Path, runs: Sequence[RunResult], summary: Mapping[str, Any]) -> list[Path]:
    """PNG plots (matplotlib, Agg canvas, no pyplot state): cached ratio, TTFT CDF, loads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    policies = summary["policies"]
    names = [run.label for run in runs]
    paths = [out_dir / name for name in PLOT_FILES]

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    ratios = [100.0 * (policies[n]["cached_token_ratio"] or 0.0) for n in names]
    bars = ax.bar(names, ratios, color=[f"C{i}" for i in range(len(names))])
    ax.bar_label(bars, fmt="%.1f%%")
    ax.set_ylabel("cached prompt tokens (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Cached-token ratio per policy")
    FigureCanvasAgg(fig)
    fig.savefig(paths[0], format="png")

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for i, run in enumerate(runs):
        values = sorted(1000.0 * r.ttft for r in run.records if r.ok and r.ttft is not None)
        if values:
            ys = [(k + 1) / len(values) for k in range(len(values))]
            ax.step(values, ys, where="post", label=run.label, color=f"C{i}")
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT distribution per policy")
    ax.grid(alpha=0.3)
    if runs:
        ax.legend()
    FigureCanvasAgg(fig)
    fig.savefig(paths[1], format="png")

    fig = Figure(figsize=(7, 2.4 * max(1, len(runs))), layout="constrained")
    axes = fig.subplots(max(1, len(runs)), 1, squeeze=False, sharex=True)
    for row, run in enumerate(runs):
        ax = axes[row][0]
        samples = run.load_samples or loads_from_records(run.records)
        workers = sorted({w for s in samples for w in s.inflight})
        for worker in workers:
            ax.plot([s.t for s in samples], [s.inflight.get(worker, 0) for s in samples],
                    label=worker, linewidth=1)  # fmt: skip
        ax.set_title(f"{run.label}: in-flight requests per worker", fontsize=10)
        ax.set_ylabel("in flight")
        if workers:
            ax.legend(fontsize=7, ncol=min(len(workers), 8), loc="upper right")
    axes[-1][0].set_xlabel("time since start (s)")
    FigureCanvasAgg(fig)
    fig.savefig(paths[2], format="png")
    return paths


def write_report(
    out_dir: Path | str, runs: Sequence[RunResult], meta: Mapping[str, Any]
) -> dict[str, Any]:
    """Write ``summary.json``, ``report.md`` and the PNG plots into ``out_dir``; return the
    summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = build_summary(runs, meta)
    plots = write_plots(out, runs, summary)
    summary["files"] = {
        "summary": "summary.json",
        "report": "report.md",
        "plots": [p.name for p in plots],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_markdown(summary, [p.name for p in plots]), "utf-8")
    return summary
