"""The soak's verdict and report: does every sampled series flatten, and the figures as
``soak.md`` and ``soak.png``.

A series is split into thirds after the warm-up and a least-squares slope fitted to each;
the last third's slope must be at most half the first third's, or small in absolute terms
(growth at that rate over the whole run under ``flat_fraction`` of the level; for file
descriptors and tasks, under ``flat_count`` over the last third). RSS must also grow by less
than ``rss_growth_limit`` over the last half (medians of three samples at each end, so one
GC pause does not decide). A leak fails both; a cache filling up to its bound passes (steep
early, flat late). Once the load has stopped and every request has answered, the task count
must be back to what it was before the load.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from load_tests.soak import SoakConfig

SERIES = ("rss_bytes", "open_fds", "asyncio_tasks", "index_blocks_total")
"""What is sampled from ``GET /admin/stats`` and judged."""


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of ``(t, value)`` points (0 with fewer than two distinct t)."""
    if len(points) < 2:
        return 0.0
    mean_t = statistics.fmean(p[0] for p in points)
    mean_v = statistics.fmean(p[1] for p in points)
    var = sum((p[0] - mean_t) ** 2 for p in points)
    if var == 0:
        return 0.0
    return sum((p[0] - mean_t) * (p[1] - mean_v) for p in points) / var


def judge(
    samples: Sequence[dict[str, Any]],
    config: SoakConfig,
    idle_before: dict[str, Any] | None = None,
    idle_after: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Does every series flatten? (see the module docstring). Returns per-series figures."""
    if not samples:
        return {"ok": False, "reason": "no samples", "series": {}}
    span = samples[-1]["t"]
    warmup = max(config.warmup_fraction * span, config.sample_interval)
    kept = [s for s in samples if s["t"] >= warmup]
    verdict: dict[str, Any] = {"ok": True, "warmup_s": round(warmup, 1), "series": {}}
    if len(kept) < 6:
        return {**verdict, "ok": False, "reason": f"only {len(kept)} samples after warm-up"}
    third = (kept[-1]["t"] - kept[0]["t"]) / 3
    for name in SERIES:
        points = [(s["t"], float(s[name])) for s in kept if s.get(name) is not None]
        first = [p for p in points if p[0] <= kept[0]["t"] + third]
        last = [p for p in points if p[0] >= kept[-1]["t"] - third]
        level = max(statistics.fmean(p[1] for p in points), 1.0)
        floor = config.flat_fraction * level / max(span, 1.0)
        if name in ("open_fds", "asyncio_tasks"):
            floor = max(floor, config.flat_count / max(third, 1.0))
        s_first, s_last = slope(first), slope(last)
        flat = s_last <= max(0.5 * s_first, floor)
        verdict["series"][name] = {
            "start": points[0][1],
            "end": points[-1][1],
            "min": min(p[1] for p in points),
            "max": max(p[1] for p in points),
            "slope_first_third_per_s": round(s_first, 4),
            "slope_last_third_per_s": round(s_last, 4),
            "flat_if_at_most_per_s": round(max(0.5 * s_first, floor), 4),
            "flattens": flat,
        }
        verdict["ok"] &= flat
    rss = [float(s["rss_bytes"]) for s in samples if s.get("rss_bytes") is not None]
    half = [s for s in samples if s["t"] >= span / 2 and s.get("rss_bytes") is not None]
    if len(half) >= 3:
        head = statistics.median(float(s["rss_bytes"]) for s in half[:3])
        tail = statistics.median(rss[-3:])
        growth = (tail - head) / head
        verdict["rss_growth_last_half"] = round(growth, 4)
        verdict["rss_growth_ok"] = growth < config.rss_growth_limit
        verdict["ok"] &= verdict["rss_growth_ok"]
    if idle_before and idle_after:
        back = idle_after["asyncio_tasks"] <= idle_before["asyncio_tasks"] + config.idle_task_slack
        verdict["idle_tasks"] = {
            "before": idle_before["asyncio_tasks"],
            "after": idle_after["asyncio_tasks"],
            "back_to_baseline": back,
        }
        verdict["ok"] &= back
    return verdict


def write_plot(path: Path, samples: Sequence[dict[str, Any]]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 7))
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2, sharex=True).flatten()
    titles = {
        "rss_bytes": "router RSS (MiB)",
        "open_fds": "router open FDs",
        "asyncio_tasks": "router asyncio tasks",
        "index_blocks_total": "warm-index blocks (all workers)",
    }
    t = [s["t"] for s in samples]
    for ax, name in zip(axes, SERIES, strict=True):
        scale = 2**20 if name == "rss_bytes" else 1
        ax.plot(t, [(s.get(name) or 0) / scale for s in samples], marker=".", linewidth=1)
        ax.set_title(titles[name])
        ax.set_xlabel("seconds")
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _fmt(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 2**20:.1f} MiB" if name == "rss_bytes" else f"{value:.0f}"


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    verdict, requests = result["verdict"], result["requests"]
    lines = [
        "# Soak",
        "",
        f"`{result['command']}`: {result['config']['duration']:.0f} s at "
        f"{result['config']['rate']} requests/s, {result['config']['workers']} simulated "
        "workers, router with the Redis warm index and load board.",
        "",
        f"Requests: {requests['sent']} sent, {requests['ok']} ok, {requests['errors']} errors, "
        f"{requests['not_sent']} not sent; cached-token ratio {requests['cached_ratio']}; "
        f"latency p50 {requests['latency_p50_s']} s, p99 {requests['latency_p99_s']} s.",
        "",
        f"Verdict: **{'flat' if verdict['ok'] else 'GROWING'}** "
        f"(warm-up {verdict.get('warmup_s')} s left out"
        + (
            f"; RSS growth over the last half {verdict['rss_growth_last_half']:.2%}"
            if "rss_growth_last_half" in verdict
            else ""
        )
        + ").",
        "",
        "| Series | start | end | min | max | slope first third /s | last third /s | flattens |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in verdict.get("series", {}).items():
        lines.append(
            f"| {name} | {_fmt(name, s['start'])} | {_fmt(name, s['end'])} | "
            f"{_fmt(name, s['min'])} | {_fmt(name, s['max'])} | "
            f"{s['slope_first_third_per_s']} | {s['slope_last_third_per_s']} | "
            f"{'yes' if s['flattens'] else 'NO'} |"
        )
    if "idle_tasks" in verdict:
        idle = verdict["idle_tasks"]
        lines += [
            "",
            f"Idle asyncio tasks before the load {idle['before']}, after {idle['after']}.",
        ]
    lines += ["", "![soak](soak.png)", ""]
    path.write_text("\n".join(lines))
