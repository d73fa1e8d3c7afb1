"""Offline tuner: sweep the routing thresholds over a replayed trace and recommend settings.

``python -m load_tests tune --scenario NAME | --trace FILE --workers N`` shapes the trace once
(`load_tests.replay_shapes`), replays it (`load_tests.replay`) once per point of a grid of
``load_factor`` x ``min_match_blocks`` x ``affinity_blocks`` with the live ``cache_aware``
policy (plus ``round_robin`` as a reference), and writes into ``--out``:

- ``tune.json``: every point's figures, the Pareto front, the recommendation;
- ``tune.md``: the same as tables, with the plots;
- ``tune_load.png`` (cached-token ratio against max/mean load, Pareto front marked) and
  ``tune_ttft.png`` (cached-token ratio against p99 TTFT).

Load is the busiest worker's mean in-flight over the mean (what the load-test report calls
``load_peak_mean_over_mean``). The recommendation: among the points whose load is within
``--load-bound``, the highest cached-token ratio; ratios within ``TIE_TOLERANCE`` of the best
count as ties, broken by the lower p99 TTFT. ``--verify-live`` then replays the same trace
through real simulators and a real router with the recommended settings and reports both
ratios (`load_tests.tune_live`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from load_tests.replay import ClusterSpec, ReplayResult, replay
from load_tests.replay_shapes import ShapedTrace, shape_requests, shape_workload
from load_tests.workload import Trace, WorkloadConfig, generate_trace, read_trace
from router.core.model import Tuning

TIE_TOLERANCE = 0.0005
"""Cached-token ratios closer than this (absolute) are ties for the recommendation."""
DEFAULT_LOAD_BOUND = 1.3
PLOTS = ("tune_load.png", "tune_ttft.png")


@dataclass(frozen=True, slots=True)
class Grid:
    """The thresholds swept (every combination), and the baselines replayed beside them."""

    load_factors: tuple[float, ...] = (1.1, 1.25, 1.5, 2.0)
    min_match_blocks: tuple[int, ...] = (1, 2, 4, 8)
    affinity_blocks: tuple[int, ...] = (4, 8, 16, 32)
    baselines: tuple[str, ...] = ("round_robin",)

    def points(self) -> list[tuple[str, Tuning]]:
        """(policy, tuning) for each replay: the cache_aware grid first, then the baselines."""
        points = [
            ("cache_aware", Tuning(load_factor=lf, min_match_blocks=mm, affinity_blocks=ab))
            for lf in self.load_factors
            for mm in self.min_match_blocks
            for ab in self.affinity_blocks
        ]
        points.extend((name, Tuning()) for name in self.baselines)
        return points


@dataclass(frozen=True, slots=True)
class Point:
    """One replayed configuration as the tuner compares it."""

    policy: str
    tuning: Tuning
    ratio: float
    load: float
    p99_ms: float

    @classmethod
    def of(cls, result: ReplayResult) -> Point:
        return cls(
            result.policy,
            result.tuning,
            result.cached_token_ratio or 0.0,
            result.load_max_over_mean if result.load_max_over_mean is not None else 1.0,
            result.ttft_ms.get("p99") or 0.0,
        )


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the points no other point beats on both ratio (higher) and load (lower).

    A point is dominated when another has a ratio >= and a load <= with one of them strict;
    exact duplicates are all kept. Returned in order of increasing load.
    """
    front = []
    for i, p in enumerate(points):
        dominated = any(
            q.ratio >= p.ratio and q.load <= p.load and (q.ratio > p.ratio or q.load < p.load)
            for q in points
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i].load, -points[i].ratio, i))


def recommend(
    points: Sequence[Point], load_bound: float, tolerance: float = TIE_TOLERANCE
) -> tuple[int, bool]:
    """(index of the recommended point, whether it is within ``load_bound``).

    Only cache_aware points are candidates. Within the bound: the highest ratio, ties (within
    ``tolerance``) to the lower p99 TTFT, then the lower load, then grid order. When no point
    is within the bound: the one with the lowest load (the closest to it).
    """
    candidates = [i for i, p in enumerate(points) if p.policy == "cache_aware"]
    if not candidates:
        raise ValueError("no cache_aware point to recommend")
    within = [i for i in candidates if points[i].load <= load_bound]
    if not within:
        return min(candidates, key=lambda i: (points[i].load, -points[i].ratio, i)), False
    best = max(points[i].ratio for i in within)
    tied = [i for i in within if points[i].ratio >= best - tolerance]
    return min(tied, key=lambda i: (points[i].p99_ms, points[i].load, -points[i].ratio, i)), True


# --- running the sweep ----------------------------------------------------------------------


def _run_chunk(
    shaped: ShapedTrace,
    cluster: ClusterSpec,
    chunk: Sequence[tuple[int, str, Tuning]],
    results: Any,
) -> None:
    for index, policy, tuning in chunk:
        results.put((index, replay(shaped, cluster, tuning, policy)))


def sweep(
    shaped: ShapedTrace,
    cluster: ClusterSpec,
    points: Sequence[tuple[str, Tuning]],
    *,
    jobs: int = 1,
    on_result: Callable[[ReplayResult], None] | None = None,
) -> list[ReplayResult]:
    """Replay every point; results in the order of ``points`` whatever ``jobs`` is.

    With ``jobs`` > 1 the points are dealt round robin to forked processes, which inherit the
    shaped trace instead of receiving a pickled copy (only results travel back).
    """
    numbered = [(i, policy, tuning) for i, (policy, tuning) in enumerate(points)]
    results: dict[int, ReplayResult] = {}
    if jobs <= 1 or len(numbered) <= 1:
        for index, policy, tuning in numbered:
            results[index] = replay(shaped, cluster, tuning, policy)
            if on_result is not None:
                on_result(results[index])
        return [results[i] for i in range(len(numbered))]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [
        context.Process(target=_run_chunk, args=(shaped, cluster, numbered[k::jobs], queue))
        for k in range(min(jobs, len(numbered)))
    ]
    for process in workers:
        process.start()
    try:
        while len(results) < len(numbered):
            index, result = queue.get(timeout=3600)
            results[index] = result
            if on_result is not None:
                on_result(result)
    finally:
        for process in workers:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join()
    return [results[i] for i in range(len(numbered))]


# --- inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TuneInput:
    """What to replay: the cluster, and the trace (as a config to generate, or requests)."""

    name: str
    cluster: ClusterSpec
    workload: WorkloadConfig | None = None
    trace: Trace | None = None

    def shape(self, *, exact: bool) -> ShapedTrace:
        """Shapes for the replay: exact from bodies, or structural from the config."""
        bs, chars = self.cluster.block_size, self.cluster.block_chars
        if self.trace is not None:
            return shape_requests(self.trace.requests, block_chars=chars, block_size=bs)
        assert self.workload is not None
        if exact:
            trace = generate_trace(self.workload)
            return shape_requests(trace.requests, block_chars=chars, block_size=bs)
        return shape_workload(self.workload, block_chars=chars, block_size=bs)

    def real_trace(self) -> Trace:
        if self.trace is not None:
            return self.trace
        assert self.workload is not None
        return generate_trace(self.workload)


def scenario_input(
    name: str,
    *,
    workers: int | None,
    requests: int | None,
    rate: float | None = None,
    tenants: int | None = None,
) -> TuneInput:
    """A named scenario (`load_tests.scenarios`), resized to ``workers`` and ``requests``.

    With more (or fewer) workers than the scenario's, its rate and tenant count scale in
    proportion, so the load per worker and the heads per cache stay as designed; ``rate`` and
    ``tenants`` override that. ``requests`` caps the trace, lengthening it when needed.
    """
    from load_tests.scenarios import get_scenario

    scenario = get_scenario(name)
    workload = scenario.workload
    count = workers or scenario.workers
    scale = count / scenario.workers
    new_rate = rate if rate is not None else workload.rate * scale
    new_tenants = tenants if tenants is not None else max(1, round(workload.tenants * scale))
    duration = workload.duration
    if requests is not None:
        duration = max(duration, 1.25 * requests / new_rate)
    workload = dataclasses.replace(
        workload, rate=new_rate, tenants=new_tenants, duration=duration, max_requests=requests
    )
    cluster = ClusterSpec(
        workers=count,
        cache_blocks=scenario.cache_blocks,
        block_size=scenario.block_size,
        prefill_us_per_token=scenario.prefill_us_per_token,
        decode_ms_per_token=scenario.decode_ms_per_token,
        max_running=scenario.max_running,
    )
    return TuneInput(name, cluster, workload=workload)


# --- report ---------------------------------------------------------------------------------


def build_report(
    source: TuneInput,
    shaped: ShapedTrace,
    results: Sequence[ReplayResult],
    load_bound: float,
    timings: dict[str, float],
) -> dict[str, Any]:
    """The tune.json document."""
    points = [Point.of(r) for r in results]
    front = pareto_front(points)
    chosen, within = recommend(points, load_bound)
    rec = points[chosen]
    return {
        "input": {
            "name": source.name,
            "mode": shaped.meta.get("mode"),
            "requests": len(shaped),
            "cluster": dataclasses.asdict(source.cluster),
            "workload": source.workload.to_json() if source.workload is not None else None,
        },
        "load_bound": load_bound,
        "load_metric": "busiest worker's mean in-flight / mean over workers",
        "tie_tolerance": TIE_TOLERANCE,
        "points": [r.to_json() for r in results],
        "pareto_front": front,
        "recommended": {
            "index": chosen,
            "within_bound": within,
            "settings": {
                "load_factor": rec.tuning.load_factor,
                "min_match_blocks": rec.tuning.min_match_blocks,
                "affinity_blocks": rec.tuning.affinity_blocks,
            },
            "cached_token_ratio": round(rec.ratio, 6),
            "load_max_over_mean": round(rec.load, 4),
            "ttft_p99_ms": rec.p99_ms,
        },
        "timings_s": timings,
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}%"


def render_markdown(report: dict[str, Any]) -> str:
    rec = report["recommended"]
    settings = rec["settings"]
    inp = report["input"]
    lines = [
        f"# Offline tuning: {inp['name']}",
        "",
        f"{inp['requests']} requests ({inp['mode']} shapes) over "
        f"{inp['cluster']['workers']} simulated workers of {inp['cluster']['cache_blocks']} "
        f"blocks x {inp['cluster']['block_size']} tokens; load bound max/mean <= "
        f"{report['load_bound']}.",
        "",
        "## Recommendation",
        "",
        f"- `load_factor: {settings['load_factor']}`, `min_match_blocks: "
        f"{settings['min_match_blocks']}`, `affinity_blocks: {settings['affinity_blocks']}`",
        f"- predicted cached-token ratio {_pct(rec['cached_token_ratio'])}, max/mean load "
        f"{rec['load_max_over_mean']}, p99 TTFT {rec['ttft_p99_ms']} ms"
        + ("" if rec["within_bound"] else " (**no point met the load bound**; closest shown)"),
    ]
    live = report.get("live")
    if live:
        lines += [
            "",
            "## Live check",
            "",
            f"- predicted {_pct(live['predicted_ratio'])}, live {_pct(live['live_ratio'])}: "
            f"gap {live['relative_gap'] * 100:.2f}% of the prediction "
            f"({'within' if live['within_2pct'] else 'OUTSIDE'} 2%)",
            f"- command: `{live['command']}`",
        ]
    lines += [
        "",
        "## All points",
        "",
        "Pareto-optimal points (ratio vs load) are marked *.",
        "",
        "| | policy | load_factor | min_match | affinity | cached | max/mean | p99 TTFT ms "
        "| spill |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    front = set(report["pareto_front"])
    for i, p in enumerate(report["points"]):
        mark = ("*" if i in front else "") + (" **rec**" if i == rec["index"] else "")
        lines.append(
            f"| {mark} | {p['policy']} | {p['load_factor']} | {p['min_match_blocks']} | "
            f"{p['affinity_blocks']} | {_pct(p['cached_token_ratio'])} | "
            f"{p['load_max_over_mean']} | {p['ttft_ms']['p99']} | {_pct(p['spill_rate'])} |"
        )
    lines += ["", *(f"![{name}]({name})" for name in PLOTS), ""]
    return "\n".join(lines)


def write_plots(out: Path, report: dict[str, Any]) -> list[Path]:
    """Cached-token ratio against load (Pareto front marked) and against p99 TTFT."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = report["points"]
    front = report["pareto_front"]
    rec = report["recommended"]["index"]
    ratio = [100.0 * (p["cached_token_ratio"] or 0.0) for p in points]
    axes_x = {
        PLOTS[0]: ([p["load_max_over_mean"] or 1.0 for p in points], "max / mean in-flight"),
        PLOTS[1]: ([p["ttft_ms"]["p99"] or 0.0 for p in points], "p99 TTFT (ms)"),
    }
    written = []
    for name, (xs, label) in axes_x.items():
        figure = Figure(figsize=(7, 4.5))
        FigureCanvasAgg(figure)
        ax = figure.add_subplot()
        aware = [i for i, p in enumerate(points) if p["policy"] == "cache_aware"]
        others = [i for i, p in enumerate(points) if p["policy"] != "cache_aware"]
        ax.scatter([xs[i] for i in aware], [ratio[i] for i in aware], s=18, label="cache_aware")
        for i in others:
            ax.scatter([xs[i]], [ratio[i]], marker="x", s=40, label=points[i]["policy"])
        if name == PLOTS[0]:
            ax.plot([xs[i] for i in front], [ratio[i] for i in front], "-o", ms=4, lw=1,
                    color="tab:red", label="Pareto front")  # fmt: skip
            ax.axvline(report["load_bound"], ls="--", color="grey", label="load bound")
        ax.scatter([xs[rec]], [ratio[rec]], marker="*", s=220, color="gold", edgecolor="k",
                   zorder=5, label="recommended")  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylabel("cached prompt tokens (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        figure.tight_layout()
        path = out / name
        figure.savefig(path, dpi=110)
        written.append(path)
    return written


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "tune.md").write_text(render_markdown(report))
    write_plots(out, report)


# --- CLI ------------------------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``tune`` subcommand's options."""
    grid = Grid()
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--scenario", help="a named scenario (load_tests/scenarios.py)")
    source.add_argument("--trace", type=Path, help="a trace file (write_trace format)")
    parser.add_argument("--workers", type=int, help="workers (default: the scenario's)")
    parser.add_argument("--requests", type=int, help="cap (and if needed lengthen) the trace")
    parser.add_argument("--rate", type=float, help="mean requests/s (default: scaled)")
    parser.add_argument("--tenants", type=int, help="tenants (default: scaled)")
    parser.add_argument("--cache-blocks", type=int, help="KV blocks per worker (--trace)")
    parser.add_argument("--out", type=Path, default=Path("reports/tune"))
    parser.add_argument("--load-bound", type=float, default=DEFAULT_LOAD_BOUND)
    parser.add_argument("--jobs", type=int, default=1, help="processes for the sweep")
    parser.add_argument("--exact", action="store_true",
                        help="shape the scenario from real bodies (slower, exact)")  # fmt: skip
    parser.add_argument("--load-factors", type=_floats, default=grid.load_factors)
    parser.add_argument("--min-match-blocks", type=_ints, default=grid.min_match_blocks)
    parser.add_argument("--affinity-blocks", type=_ints, default=grid.affinity_blocks)
    parser.add_argument("--verify-live", action="store_true",
                        help="replay the trace live with the recommended settings")  # fmt: skip


def resolve_input(args: argparse.Namespace) -> TuneInput:
    if args.scenario:
        return scenario_input(
            args.scenario,
            workers=args.workers,
            requests=args.requests,
            rate=args.rate,
            tenants=args.tenants,
        )
    if not args.workers:
        raise ValueError("--trace needs --workers")
    trace = read_trace(args.trace)
    if args.requests is not None:
        trace = Trace(trace.meta, trace.requests[: args.requests])
    cluster = ClusterSpec(workers=args.workers)
    if args.cache_blocks:
        cluster = dataclasses.replace(cluster, cache_blocks=args.cache_blocks)
    return TuneInput(str(args.trace), cluster, trace=trace)


def run_cli(args: argparse.Namespace, console: Console | None = None) -> int:
    """Run the ``tune`` subcommand; 0 on success, 2 when --verify-live misses the 2% goal."""
    console = console or Console()
    timings: dict[str, float] = {}
    source = resolve_input(args)
    exact = bool(args.exact or args.verify_live)
    began = time.perf_counter()
    shaped = source.shape(exact=exact)
    timings["shape"] = round(time.perf_counter() - began, 3)
    console.print(
        f"shaped {len(shaped)} requests ({shaped.meta.get('mode')}) in {timings['shape']} s",
        highlight=False,
    )
    grid = Grid(args.load_factors, args.min_match_blocks, args.affinity_blocks)
    points = grid.points()
    began = time.perf_counter()
    with Progress(
        TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=not console.is_terminal,
    ) as progress:  # fmt: skip
        task = progress.add_task("sweep", total=len(points))
        results = sweep(
            shaped, source.cluster, points, jobs=args.jobs,
            on_result=lambda _r: progress.advance(task),
        )  # fmt: skip
    timings["sweep"] = round(time.perf_counter() - began, 3)
    timings["replay_mean"] = round(sum(r.wall_s for r in results) / len(results), 3)
    report = build_report(source, shaped, results, args.load_bound, timings)
    status = 0
    if args.verify_live:
        from load_tests.tune_live import verify_live

        rec = report["recommended"]
        live = verify_live(
            source.real_trace(),
            source.cluster,
            results[rec["index"]].tuning,
            predicted=rec["cached_token_ratio"],
            out=args.out,
            console=console,
        )
        live["command"] = "python -m load_tests " + shlex.join(sys.argv[1:])
        report["live"] = live
        status = 0 if live["within_2pct"] else 2
    write_report(args.out, report)
    rec = report["recommended"]
    console.print(
        f"recommended {rec['settings']}: cached {_pct(rec['cached_token_ratio'])}, "
        f"max/mean {rec['load_max_over_mean']}, p99 TTFT {rec['ttft_p99_ms']} ms; "
        f"report {args.out / 'tune.md'}",
        highlight=False,
    )
    return status
