"""Command line of the load tests: ``python -m load_tests demo --out reports/demo``.

Subcommands are small functions over the library modules (workload, client, report), so
later ones (running a scenario, comparing routers) plug in beside ``demo``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from rich.console import Console

from load_tests import bench, tune
from load_tests.compare import (
    OUR_POLICIES,
    PEER_ROUTERS,
    run_against,
    run_compare,
    targets_for,
)
from load_tests.demo import DemoConfig, run_demo
from load_tests.procs import ProcessStartError
from load_tests.scenarios import SCENARIOS, Scenario, get_scenario
from load_tests.soak import SoakConfig, run_soak


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def _count(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m load_tests", description="Load tests and the demo for prefix-router."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = DemoConfig(out=Path("reports/demo"))
    demo = commands.add_parser(
        "demo",
        help="round robin vs cache-aware on one trace, with a report",
        description="Start simulated workers and the router for each policy, drive the same "
        "seeded trace through it, and write summary.json, report.md and PNG plots.",
    )
    demo.add_argument("--out", type=Path, default=defaults.out, help="report directory")
    demo.add_argument("--seed", type=int, default=defaults.seed, help="trace seed")
    demo.add_argument(
        "--duration", type=_positive, default=defaults.duration, help="seconds per policy"
    )
    demo.add_argument("--workers", type=_count, default=defaults.workers, help="simulators")
    demo.add_argument(
        "--rate", type=_positive, default=defaults.rate, help="mean requests per second"
    )
    demo.add_argument("--tenants", type=_count, default=defaults.tenants)
    demo.add_argument(
        "--cache-blocks", type=_count, default=defaults.cache_blocks, help="KV blocks per worker"
    )
    soak_defaults = SoakConfig(out=Path("reports/soak"))
    soak = commands.add_parser(
        "soak",
        help="a steady load for a bounded time, watching the router's resources for leaks",
        description="Start simulated workers, Redis and the router, drive a steady rate of "
        "synthetic tenants for --duration seconds, sample the router's RSS, open FDs, asyncio "
        "tasks and warm-index size, and write soak.json, soak.md and soak.png. Exit code 3 "
        "when a series does not flatten.",
    )
    soak.add_argument("--out", type=Path, default=soak_defaults.out, help="report directory")
    soak.add_argument(
        "--duration", type=_positive, default=soak_defaults.duration, help="seconds of load"
    )
    soak.add_argument(
        "--rate", type=_positive, default=soak_defaults.rate, help="requests per second"
    )
    soak.add_argument("--seed", type=int, default=soak_defaults.seed)
    soak.add_argument("--workers", type=_count, default=soak_defaults.workers, help="simulators")
    soak.add_argument("--tenants", type=_count, default=soak_defaults.tenants)
    soak.add_argument(
        "--sample-interval",
        type=_positive,
        default=soak_defaults.sample_interval,
        help="seconds between samples",
    )
    _add_scenario_commands(commands)
    tuner = commands.add_parser(
        "tune",
        help="offline replay of a trace over a simulated cluster; sweep and recommend thresholds",
        description="Replay a scenario (or a recorded trace) through the router's own policy "
        "code over a simulated cluster, in simulated time; sweep load_factor, "
        "min_match_blocks and affinity_blocks; write tune.json, tune.md and plots with the "
        "Pareto front and a recommendation for --load-bound (docs/tuning-offline.md).",
    )
    tune.add_arguments(tuner)
    bench.add_arguments(
        commands.add_parser(
            "bench",
            help="router overhead: direct vs prefix-router vs sglang-router",
            description=(bench.__doc__ or "").split("\n\n")[0],
        )
    )
    return parser


def _scenario_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenario", required=True, choices=sorted(SCENARIOS), help="named scenario"
    )
    parser.add_argument(
        "--duration", type=_positive, help="seconds of traffic (default: the scenario's)"
    )
    parser.add_argument(
        "--short", action="store_true", help="the scenario's few-second form (harness checks)"
    )
    parser.add_argument("--out", type=Path, required=True, help="report directory")


def _add_scenario_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    names = "; ".join(f"{s.name}: {s.summary}" for s in SCENARIOS.values())
    run = commands.add_parser(
        "run",
        help="drive a scenario's trace against a running OpenAI-compatible endpoint",
        description="Send a scenario's seeded trace to --target and write summary.json, "
        f"report.md and plots (with the oracle bound). Scenarios: {names}",
    )
    run.add_argument("--target", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    run.add_argument("--admin-token", help="sample per-worker loads from our admin API")
    _scenario_args(run)
    compare = commands.add_parser(
        "compare",
        help="bring up workers and each router on loopback, the same trace through each",
        description="For each target: fresh simulated workers, the router (ours in each "
        "--policies, then with --peers sglang-router and vllm-router in cache_aware and "
        f"round_robin), the scenario's trace, teardown; then one report. Scenarios: {names}",
    )
    _scenario_args(compare)
    compare.add_argument(
        "--policies",
        nargs="+",
        default=list(OUR_POLICIES),
        choices=[*OUR_POLICIES, "consistent_hash"],
        help="our router's policies to run",
    )
    compare.add_argument(
        "--tuning",
        action="append",
        default=[],
        metavar="NAME=VALUE,...",
        help="also run cache_aware with these thresholds (e.g. the tuner's recommendation "
        "'load_factor=2,min_match_blocks=1'); repeatable",
    )
    compare.add_argument(
        "--peers",
        nargs="*",
        choices=list(PEER_ROUTERS),
        help="also run the peer routers (all of them when given without names)",
    )


def _scenario_of(args: argparse.Namespace) -> Scenario:
    scenario = get_scenario(args.scenario)
    if args.short:
        scenario = scenario.short()
    if args.duration:
        scenario = scenario.with_duration(args.duration)
    return scenario


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (CI timeouts, `kill`) unwinds exactly like Ctrl-C, so every process is stopped.

    Re-raised as SIGINT so that inside ``asyncio.run`` the runner's own handler cancels the
    main task cleanly (a KeyboardInterrupt raised in whatever task happens to be running
    would not); outside the loop, or where SIGINT is ignored, it is a KeyboardInterrupt.
    """
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
        raise KeyboardInterrupt
    signal.raise_signal(signal.SIGINT)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.command == "demo":
            config = DemoConfig(
                out=args.out,
                seed=args.seed,
                duration=args.duration,
                workers=args.workers,
                rate=args.rate,
                tenants=args.tenants,
                cache_blocks=args.cache_blocks,
            )
            run_demo(config, console)
        elif args.command == "soak":
            result = run_soak(
                SoakConfig(
                    out=args.out,
                    duration=args.duration,
                    rate=args.rate,
                    seed=args.seed,
                    workers=args.workers,
                    tenants=args.tenants,
                    sample_interval=args.sample_interval,
                ),
                console,
            )
            if not result["verdict"]["ok"]:
                return 3
        elif args.command == "run":
            run_against(_scenario_of(args), args.target, args.out, admin_token=args.admin_token,
                        console=console)  # fmt: skip
        elif args.command == "bench":
            return bench.run_cli(args)
        elif args.command == "tune":
            return tune.run_cli(args, console)
        elif args.command == "compare":
            peers = [] if args.peers is None else (args.peers or list(PEER_ROUTERS))
            try:
                targets = targets_for(args.policies, peers, args.tuning)
            except ValueError as exc:
                console.print(f"error: {exc}", style="red", markup=False, highlight=False)
                return 2
            run_compare(_scenario_of(args), targets, args.out, console)
    except KeyboardInterrupt:
        console.print("interrupted; every started process was stopped", style="yellow")
        return 130
    except ProcessStartError as exc:
        console.print(f"error: {exc}", style="red", markup=False, highlight=False)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
