"""The router overhead benchmark's figures: added latency, ratios, the design targets met or
not, as JSON, Markdown and a rich table.

Added latency is a target's percentile minus the direct path's at the same point (a
difference of percentiles, not a percentile of differences: the honest figure wrk gives).
"Per core" is requests per CPU-second of the target's own processes, so a router that uses
two cores to serve twice the rate scores the same as one that uses one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table

POINTS = ("c1", "half_peak", "c64")
POINT_TITLES = {
    "c1": "1 connection",
    "half_peak": "~half our peak rate",
    "c64": "64 connections (peak)",
}
TARGET_ADDED_P50_MS = 0.3
TARGET_ADDED_P99_MS = 1.5
TARGET_PER_CORE_RATIO = 0.5


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _added(point: Mapping[str, Any], base: Mapping[str, Any] | None) -> dict[str, float] | None:
    if base is None:
        return None
    return {
        q: round(point["latency_ms"][q] - base["latency_ms"][q], 3)
        for q in ("50", "99")
        if q in point["latency_ms"] and q in base["latency_ms"]
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def _find(targets: Sequence[Mapping[str, Any]], kind: str) -> list[Mapping[str, Any]]:
    return [t for t in targets if t["kind"] == kind]


def summarize(targets: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Everything in ``bench.json``: the raw points, added latencies, ratios and verdicts."""
    direct = next((t for t in targets if t["kind"] == "direct"), None)
    for target in targets:
        for name, point in target["points"].items():
            base = None if direct is None or target is direct else direct["points"].get(name)
            point["added_ms"] = _added(point, base)
    ours = _find(targets, "ours")
    peers = _find(targets, "peer")
    peer = peers[0] if peers else None
    ratios: dict[str, Any] = {}
    for mine in ours:
        key = f"processes_{mine['processes']}"
        entry: dict[str, Any] = {}
        if peer is not None:
            for point in ("c64",):
                a, b = mine["points"].get(point), peer["points"].get(point)
                if a and b:
                    entry["rps_per_cpu_s_vs_peer"] = _ratio(a["rps_per_cpu_s"], b["rps_per_cpu_s"])
                    entry["rps_vs_peer"] = _ratio(a["rps"], b["rps"])
            for point in ("c1", "half_peak"):
                a, b = mine["points"].get(point), peer["points"].get(point)
                if a and b and a["added_ms"] and b["added_ms"]:
                    entry[f"added_ms_{point}"] = {"ours": a["added_ms"], "peer": b["added_ms"]}
        ratios[key] = entry
    errors_total = sum(p["error_count"] for t in targets for p in t["points"].values())
    result = {
        "meta": meta,
        "targets": targets,
        "ratios": ratios,
        "peer": None if peer is None else peer["name"],
        "errors_total": errors_total,
    }
    result["verdicts"] = _verdicts(ours, peer, errors_total)
    return result


def _verdicts(
    ours: Sequence[Mapping[str, Any]], peer: Mapping[str, Any] | None, errors: int
) -> list[str]:
    lines: list[str] = []
    for mine in ours:
        label = mine["name"]
        half = mine["points"].get("half_peak")
        if half and half["added_ms"]:
            p50, p99 = half["added_ms"]["50"], half["added_ms"]["99"]
            lines.append(
                f"{label}: added latency at ~{half['rps']:.0f} req/s: "
                f"p50 {p50:.3f} ms {_goal(p50 < TARGET_ADDED_P50_MS, f'< {TARGET_ADDED_P50_MS}')}, "
                f"p99 {p99:.3f} ms {_goal(p99 < TARGET_ADDED_P99_MS, f'< {TARGET_ADDED_P99_MS}')}"
            )
        peak = mine["points"].get("c64")
        other = None if peer is None else peer["points"].get("c64")
        if peak and other and peer is not None:
            ratio = _ratio(peak["rps_per_cpu_s"], other["rps_per_cpu_s"])
            met = ratio is not None and ratio >= TARGET_PER_CORE_RATIO
            lines.append(
                f"{label}: {peak['rps_per_cpu_s']} req per CPU-second vs {peer['name']} "
                f"{other['rps_per_cpu_s']}: ratio {ratio} "
                f"{_goal(met, f'>= {TARGET_PER_CORE_RATIO}')}"
            )
    if peer is None:
        lines.append("no peer router measured: the per-core ratio could not be computed")
    busy = [
        p["machine_busy"]
        for t in (*ours, *([peer] if peer else []))
        for name, p in t["points"].items()
        if name == "half_peak" and p.get("machine_busy") is not None
    ]
    if busy and max(busy) > QUIET_BUSY:
        lines.append(
            f"the machine was up to {max(busy):.0%} busy during the half-peak points, where the "
            "benchmark alone keeps it far lower: other processes competed for the CPU, so "
            "latencies and CPU seconds are inflated; rerun on a quiet machine"
        )
    lines.append(f"errors over all points: {errors}")
    return lines


def _goal(met: bool, target: str) -> str:
    return f"(target {target}: {'met' if met else 'NOT met'})"


def _pair(entry: Mapping[str, Mapping[str, float]] | None) -> str:
    if not entry:
        return "-"
    ours, peer = entry["ours"], entry["peer"]
    return f"{ours['50']:.3f}/{ours['99']:.3f} vs {peer['50']:.3f}/{peer['99']:.3f}"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _rows(result: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for target in result["targets"]:
        for point in POINTS:
            figures = target["points"].get(point)
            if figures is None:
                continue
            added = figures.get("added_ms") or {}
            lat = figures["latency_ms"]
            rows.append([
                target["name"], point, str(figures["connections"]), f"{figures['rps']:.0f}",
                _fmt(lat.get("50")), _fmt(lat.get("99")), _fmt(added.get("50")),
                _fmt(added.get("99")), _fmt(figures["cpu_s"], 2),
                "-" if figures["rps_per_cpu_s"] is None else f"{figures['rps_per_cpu_s']:.0f}",
                str(figures["error_count"]), _fmt(figures.get("machine_busy"), 2),
            ])  # fmt: skip
    return rows


HEADERS = [
    "target", "point", "conns", "req/s", "p50 ms", "p99 ms", "added p50", "added p99",
    "CPU s", "req/CPU-s", "errors", "busy",
]  # fmt: skip
QUIET_BUSY = 0.6
"""At the half-peak points the benchmark itself keeps the machine well under this share busy;
above it, other processes were competing for the cores and the figures are inflated."""


def render_table(result: Mapping[str, Any]) -> Table:
    table = Table(title="router overhead (added = target - direct at the same point)")
    for header in HEADERS:
        table.add_column(header, justify="left" if header in ("target", "point") else "right")
    for row in _rows(result):
        table.add_row(*row)
    return table


def _titles(meta: Mapping[str, Any]) -> dict[str, str]:
    titles = dict(POINT_TITLES)
    if meta.get("half_peak_rps"):
        titles["half_peak"] += (
            f" ({meta['half_peak_rps']:.0f} req/s aimed at: a few connections paced by wrk's "
            "delay hook; the achieved rate is in the table)"
        )
    return titles


def render_markdown(result: Mapping[str, Any]) -> str:
    meta = result["meta"]
    machine = meta["machine"]
    config = meta["config"]
    lines = [
        "# Router overhead benchmark",
        "",
        f"`{meta['command']}`: {config['duration']:g} s per point after a {config['warmup']:g} s "
        f"warm-up; {config['workers']} instant workers; ~{meta['body_bytes_mean']} B chat bodies "
        f"(a different tail on each); load from wrk, {config['threads']} thread.",
        "",
        f"Machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), Linux "
        f"{machine['kernel']}, Python {machine['python']}, "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
        + f"; {machine['wrk']}.",
        "",
        "Points: "
        + "; ".join(f"`{k}` = {v}" for k, v in _titles(meta).items())
        + ". Added latency is the target's percentile minus the direct path's at the same "
        "point. req/CPU-s is requests per CPU-second of the target's own processes "
        "(/proc utime+stime), i.e. requests/s per core.",
        "",
        "Targets: "
        + "; ".join(f"`{t['name']}`: {t['meta'].get('what', t['kind'])}" for t in result["targets"])
        + ".",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---" for _ in HEADERS) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(result)]
    lines += ["", "## Against the targets (DESIGN.md section 12)", ""]
    lines += [f"- {line}" for line in result["verdicts"]]
    if any(result["ratios"].values()):
        lines += [
            "",
            f"## Against {result['peer']}",
            "",
            "| ours | req/CPU-s ratio | req/s ratio (c64) | added p50/p99 ms at c1, ours vs peer "
            "| added p50/p99 ms at half peak, ours vs peer |",
            "|---|---|---|---|---|",
        ]
        for key, entry in result["ratios"].items():
            if entry:
                lines.append(
                    f"| {key.replace('processes_', '')} process(es) "
                    f"| {_fmt(entry.get('rps_per_cpu_s_vs_peer'))} "
                    f"| {_fmt(entry.get('rps_vs_peer'))} "
                    f"| {_pair(entry.get('added_ms_c1'))} "
                    f"| {_pair(entry.get('added_ms_half_peak'))} |"
                )
    if meta.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in meta["notes"]]
    lines += [
        "",
        "`busy` is the share of all cores busy during the point (/proc/stat; load generator, "
        "workers and target included): near 1.0 at the peak points is expected on 2 cores; "
        "at the half-peak points it should stay low. The workers' CPU seconds are in "
        "bench.json.",
        "",
    ]
    return "\n".join(lines)
