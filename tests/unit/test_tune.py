"""The offline tuner: Pareto front, recommendation under a load bound, sweep, CLI end to end."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from load_tests.replay import ClusterSpec
from load_tests.replay_shapes import shape_workload
from load_tests.tune import Grid, Point, add_arguments, pareto_front, recommend, run_cli, sweep
from load_tests.workload import WorkloadConfig, generate_trace, write_trace
from router.core.model import Tuning

TINY = WorkloadConfig(seed=9, tenants=5, rate=12.0, duration=10.0, head_tokens=(150, 300))


def _point(ratio: float, load: float, p99: float = 100.0, policy: str = "cache_aware") -> Point:
    return Point(policy, Tuning(), ratio, load, p99)


def test_pareto_front_keeps_exactly_the_undominated_points() -> None:
    """A point survives unless another has at least its ratio at no more load (one strictly)."""
    points = [
        _point(0.50, 1.00),  # 0: lowest load
        _point(0.60, 1.10),  # 1
        _point(0.55, 1.20),  # 2: dominated by 1
        _point(0.70, 1.40),  # 3: best ratio
        _point(0.70, 1.50),  # 4: dominated by 3
        _point(0.40, 1.00),  # 5: dominated by 0
    ]
    assert pareto_front(points) == [0, 1, 3]


def test_recommendation_honours_the_load_bound() -> None:
    """The best ratio within the bound wins even when a better one lies beyond it."""
    points = [_point(0.50, 1.05), _point(0.62, 1.25), _point(0.80, 1.60)]
    assert recommend(points, 1.3) == (1, True)


def test_ties_go_to_the_lower_p99_ttft() -> None:
    """Ratios within the tie tolerance are decided by p99 TTFT."""
    points = [_point(0.6000, 1.1, p99=300.0), _point(0.6003, 1.2, p99=120.0), _point(0.5, 1.0)]
    assert recommend(points, 1.3) == (1, True)
    points = [_point(0.60, 1.1, p99=300.0), _point(0.65, 1.2, p99=900.0)]
    assert recommend(points, 1.3) == (1, True)


def test_no_point_within_the_bound_gives_the_closest_and_says_so() -> None:
    """When every point is above the bound, the lowest-load one is returned, flagged."""
    points = [_point(0.7, 1.6), _point(0.6, 1.4), _point(0.9, 1.2, policy="round_robin")]
    assert recommend(points, 1.3) == (1, False)


def test_parallel_sweep_equals_serial_sweep() -> None:
    """Forked jobs return the same results, in grid order, as one process."""
    shaped = shape_workload(TINY)
    cluster = ClusterSpec(workers=3, cache_blocks=200)
    points = Grid((1.1, 2.0), (1, 4), (4,), ("round_robin",)).points()
    serial = sweep(shaped, cluster, points, jobs=1)
    parallel = sweep(shaped, cluster, points, jobs=2)
    assert [r.cached_tokens for r in serial] == [r.cached_tokens for r in parallel]
    assert [r.policy for r in parallel] == [p for p, _ in points]


def test_cli_writes_the_report_files(tmp_path: Path) -> None:
    """`tune --trace FILE` writes tune.json, tune.md and both plots, with a recommendation."""
    trace_path = write_trace(tmp_path / "trace.jsonl", generate_trace(TINY))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "tune"
    args = parser.parse_args(
        ["--trace", str(trace_path), "--workers", "2", "--cache-blocks", "200", "--out", str(out),
         "--load-factors", "1.25,2", "--min-match-blocks", "2", "--affinity-blocks", "4,8"]
    )  # fmt: skip
    with open(tmp_path / "log.txt", "w") as log:
        assert run_cli(args, Console(file=log)) == 0
    report = json.loads((out / "tune.json").read_text())
    assert len(report["points"]) == 5  # 2 x 1 x 2 grid + round robin
    assert report["recommended"]["settings"]["min_match_blocks"] == 2
    assert report["pareto_front"]
    for name in ("tune.md", "tune_load.png", "tune_ttft.png"):
        assert (out / name).stat().st_size > 0
    assert "Recommendation" in (out / "tune.md").read_text()
