"""`make bench`: what the router adds over talking to a worker directly, beside sglang-router.

One run, on one machine, so the ratios mean something even where the absolute figures are
noisy (2 cores shared by load generator, routers and workers). Two instant workers
(`load_tests.bench_worker`: a fixed chat completion, with usage, answered at once) stand
behind every target:

- ``direct``: the load generator talks to worker 0 itself: the floor every router adds to;
- ``aiohttp-bare``: a pass-through aiohttp + uvloop proxy (`load_tests.bench_bare`), the
  ceiling of a one-process Python proxy;
- ``prefix-router`` at ``--processes 1`` and 2 (policy cache_aware, default settings:
  access log and metrics on, in-process warm index);
- ``sglang-router`` (cache_aware), installed and launched by `load_tests.peers`.

Each target gets, after a warm-up, fixed-duration points with wrk (`load_tests.bench_wrk`):
1 connection (latency), 64 connections (peak requests/s), and ``half_peak``: wrk's delay hook
paces a few connections to about half of our one-process router's peak, where the overhead
target of DESIGN.md section 12 is set. Bodies are ~7 KB chat requests (a system prompt, a few
turns, a different tail on each). For every point: requests/s, latency p50/p90/p99/p99.9,
added latency (target minus direct at the same point), errors, and the CPU seconds the
target's processes used (``/proc``, see `load_tests.bench_sys`), hence requests per
CPU-second: requests/s per core.

Writes ``OUT/bench.json`` (every figure, the machine, versions) and ``OUT/bench.md``; process
stderr goes to ``OUT/logs``. Every process started is stopped on success, failure and Ctrl-C.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from rich.console import Console

from load_tests import bench_sys, procs
from load_tests.bench_report import render_markdown, render_table, summarize
from load_tests.bench_wrk import (
    WrkResult,
    chat_bodies,
    ensure_wrk,
    rate_plan,
    run_wrk,
    write_script,
)
from load_tests.demo import ProcessSet

CHAT_PATH = "/v1/chat/completions"
OURS = "prefix-router"
PEER = "sglang-router"


@dataclass(frozen=True, slots=True)
class BenchConfig:
    out: Path
    duration: float = 10.0
    """Seconds per measured point."""
    warmup: float = 3.0
    """Seconds of load before a target's first point (not recorded)."""
    low_connections: int = 1
    high_connections: int = 64
    processes: tuple[int, ...] = (1, 2)
    """Our router's ``--processes`` values, each measured as its own target."""
    peers: tuple[str, ...] = (PEER,)
    bare: bool = True
    half_peak: bool = True
    rate_fraction: float = 0.5
    workers: int = 2
    bodies: int = 512
    body_bytes: int = 7000
    seed: int = 7
    threads: int = 1
    """wrk threads (one core is plenty for wrk at these rates; more would take CPU from the
    processes under test)."""
    start_timeout: float = 60.0


@dataclass
class Target:
    name: str
    kind: str
    """direct, bare, ours or peer."""
    url: str
    pids: list[int]
    processes: int = 1
    meta: dict[str, Any] = field(default_factory=dict)
    points: dict[str, dict[str, Any]] = field(default_factory=dict)


# --- processes -------------------------------------------------------------------------------


def post_ok(url: str, body: bytes, timeout: float = 5.0) -> bool:
    """One chat POST on a fresh connection; True on HTTP 200."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request("POST", CHAT_PATH, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status == 200
    except OSError:
        return False
    finally:
        conn.close()


def wait_serving(url: str, body: bytes, *, consecutive: int, timeout: float) -> None:
    """Poll until ``consecutive`` POSTs in a row (fresh connections, so every process of a
    multi-process router is reached) answer 200, within ``timeout``."""
    deadline = time.monotonic() + timeout
    streak = 0
    while time.monotonic() < deadline:
        streak = streak + 1 if post_ok(url, body) else 0
        if streak >= consecutive:
            return
        if streak == 0:
            time.sleep(0.1)  # polling with a deadline, not waiting blind
    raise procs.ProcessStartError(f"{url} did not answer {consecutive} requests in a row")


def _ours_config(workers: Sequence[procs.ServerProcess]) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1"},
        "workers": [{"id": f"w{i}", "url": w.url} for i, w in enumerate(workers)],
        "routing": {"policy": "cache_aware"},
    }


# --- measuring -------------------------------------------------------------------------------


class Bench:
    """Runs the points of one benchmark; owns the scripts, the wrk binary and the console."""

    def __init__(self, config: BenchConfig, console: Console, work: Path) -> None:
        self.config = config
        self.console = console
        self.work = work
        self.wrk = ensure_wrk()
        bodies = chat_bodies(config.bodies, config.body_bytes, config.seed)
        self.sample_body = bodies[0]
        self.body_mean = sum(len(b) for b in bodies) / len(bodies)
        bodies_path = work / "bodies.jsonl"
        bodies_path.write_bytes(b"\n".join(bodies) + b"\n")
        self.bodies_path = bodies_path
        self.script = write_script(work / "peak.lua", bodies_path, url_path=CHAT_PATH)
        self.worker_pids: list[int] = []

    def _say(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)

    def point(
        self, target: Target, name: str, connections: int, *, delay_ms: int = 0
    ) -> dict[str, Any]:
        """One fixed-duration wrk run against ``target``, with the CPU its processes used."""
        config = self.config
        script = self.script
        if delay_ms:
            script = write_script(
                self.work / f"delay{delay_ms}.lua", self.bodies_path,
                url_path=CHAT_PATH, delay_ms=delay_ms,
            )  # fmt: skip
        pids = bench_sys.tree(target.pids)
        workers = bench_sys.tree(self.worker_pids)
        cpu0 = bench_sys.tree_cpu_seconds(pids)
        wcpu0 = bench_sys.tree_cpu_seconds(workers)
        busy0, total0 = bench_sys.machine_busy_seconds()
        result = run_wrk(
            self.wrk, target.url, script, connections=connections,
            duration_s=config.duration, threads=config.threads, delay_ms=delay_ms,
        )  # fmt: skip
        busy1, total1 = bench_sys.machine_busy_seconds()
        cpu = bench_sys.tree_cpu_seconds(pids) - cpu0
        worker_cpu = bench_sys.tree_cpu_seconds(workers) - wcpu0
        figures = _figures(result, cpu if target.pids else None, worker_cpu)
        figures["machine_busy"] = round((busy1 - busy0) / max(1e-9, total1 - total0), 3)
        target.points[name] = figures
        self._say(
            f"  {target.name:<24} {name:<9} c={connections:<3} {result.rps:>9.0f} req/s  "
            f"p50 {result.p(50):6.3f} ms  p99 {result.p(99):7.3f} ms  "
            f"cpu {figures['cpu_s'] if figures['cpu_s'] is not None else '-'} s  "
            f"errors {result.error_count}"
        )
        return figures

    def warm(self, target: Target) -> None:
        if self.config.warmup > 0:
            run_wrk(
                self.wrk, target.url, self.script, connections=self.config.high_connections,
                duration_s=self.config.warmup, threads=self.config.threads,
            )  # fmt: skip

    def measure(self, target: Target) -> None:
        self.warm(target)
        self.point(target, "c1", self.config.low_connections)
        self.point(target, "c64", self.config.high_connections)

    def half_peak(self, target: Target, rate: float, latency_ms: float) -> None:
        connections, delay_ms = rate_plan(rate, latency_ms)
        figures = self.point(target, "half_peak", connections, delay_ms=delay_ms)
        figures["target_rps"] = round(rate, 1)


def _figures(result: WrkResult, cpu: float | None, worker_cpu: float) -> dict[str, Any]:
    return {
        "connections": result.connections,
        "delay_ms": result.delay_ms,
        "duration_s": result.duration_s,
        "requests": result.requests,
        "rps": result.rps,
        "latency_ms": result.latency_ms,
        "mean_ms": result.mean_ms,
        "max_ms": result.max_ms,
        "errors": result.errors,
        "error_count": result.error_count,
        "cpu_s": None if cpu is None else round(cpu, 3),
        "rps_per_cpu_s": None if not cpu else round(result.requests / cpu, 1),
        "worker_cpu_s": round(worker_cpu, 3),
    }


def _start(
    processes: ProcessSet, name: str, argv: list[str], logs: Path, timeout: float
) -> procs.ServerProcess:
    (server,) = processes.start_all([(name, argv, logs / f"{name}.log")], timeout)
    return server


class Run:
    """The targets of one benchmark run, measured in order, sharing the workers and the rate."""

    def __init__(self, bench: Bench, workers: Sequence[procs.ServerProcess], logs: Path):
        self.bench = bench
        self.config = bench.config
        self.workers = list(workers)
        self.logs = logs
        self.rate: float | None = None
        """The half-peak rate: ``rate_fraction`` x our first router's peak."""
        self.targets: list[Target] = []
        self.notes: list[str] = []

    def measure(self, target: Target, *, sets_rate: bool = False) -> None:
        bench = self.bench
        bench.warm(target)
        bench.point(target, "c1", self.config.low_connections)
        bench.point(target, "c64", self.config.high_connections)
        if sets_rate and self.rate is None:
            self.rate = self.config.rate_fraction * target.points["c64"]["rps"]
            target.meta["half_peak_reference"] = True
        if self.config.half_peak and self.rate is not None:
            bench.half_peak(target, self.rate, target.points["c1"]["latency_ms"]["50"])
        self.targets.append(target)

    def ours(self, count: int) -> None:
        config = self.config
        cfg_path = self.bench.work / "router.yaml"
        cfg_path.write_text(yaml.safe_dump(_ours_config(self.workers)), encoding="utf-8")
        argv = [
            *procs.console_script("prefix-router"), "serve", "--config", str(cfg_path),
            "--port", "0", "--processes", str(count),
        ]  # fmt: skip
        name = f"ours-{count}p"
        with ProcessSet(self.bench.console) as routers:
            router = _start(routers, f"router-p{count}", argv, self.logs, config.start_timeout)
            wait_serving(router.url, self.bench.sample_body, consecutive=4 * count, timeout=30)
            target = Target(name, "ours", router.url, [router.pid], processes=count)
            port = urlsplit(router.url).port or 0
            target.meta["listening_pids"] = bench_sys.listening_pids(port)
            target.meta["policy"] = "cache_aware"
            target.meta["what"] = (
                f"prefix-router serve --processes {count}, policy cache_aware, default settings "
                "(access log, metrics, in-process warm index)"
            )
            self.measure(target, sets_rate=True)

    def bare(self) -> None:
        argv = [*_python(), "-m", "load_tests.bench_bare", "--port", "0"]
        for worker in self.workers:
            argv += ["--worker", worker.url]
        with ProcessSet(self.bench.console) as routers:
            bare = _start(routers, "aiohttp-bare", argv, self.logs, self.config.start_timeout)
            wait_serving(bare.url, self.bench.sample_body, consecutive=3, timeout=30)
            target = Target("aiohttp-bare", "bare", bare.url, [bare.pid])
            target.meta["what"] = "pass-through aiohttp + uvloop proxy, no routing (reference)"
            self.measure(target)

    def peer(self, name: str) -> None:
        try:
            from load_tests import peers
        except ImportError as exc:  # pragma: no cover - the module ships with the project
            self._note(f"{name}: skipped, load_tests.peers is missing ({exc})")
            return
        launch: Callable[..., Any] | None = getattr(peers, "launch_peer", None)
        if launch is None:
            self._note(f"{name}: skipped, load_tests.peers has no launch_peer yet")
            return
        try:
            peers.ensure_peer(name, console=self.bench.console)
            handle = launch(
                name, "cache_aware", [w.url for w in self.workers],
                log_path=self.logs / f"{name}.log",
            )  # fmt: skip
        except Exception as exc:
            self._note(f"{name}: skipped, it could not be installed or started: {exc}")
            return
        try:
            wait_serving(handle.url, self.bench.sample_body, consecutive=3, timeout=60)
            port = urlsplit(handle.url).port or 0
            pid = getattr(handle, "pid", None)
            pids = [pid] if isinstance(pid, int) else bench_sys.listening_pids(port)
            target = Target(name, "peer", handle.url, pids)
            target.meta.update(
                {"policy": "cache_aware", "version": (peers.peer_info(name) or {}).get("version"),
                 "pids": pids, "what": f"{name} from PyPI, policy cache_aware"}
            )  # fmt: skip
            self.measure(target)
        finally:
            handle.stop()

    def _note(self, text: str) -> None:
        self.notes.append(text)
        self.bench.console.print(text, style="yellow", markup=False, highlight=False)


def _python() -> list[str]:
    return [sys.executable]


def run_bench(config: BenchConfig, console: Console | None = None) -> dict[str, Any]:
    """Measure every target, write ``bench.json`` and ``bench.md`` into ``config.out``."""
    console = console or Console()
    began = time.monotonic()
    out = config.out
    logs = out / "logs"
    work = out / "work"
    for directory in (out, logs, work):
        directory.mkdir(parents=True, exist_ok=True)
    bench = Bench(config, console, work)
    console.rule("[bold]router overhead benchmark")
    with ProcessSet(console) as worker_set:
        specs = [
            (f"worker{i}",
             [*_python(), "-m", "load_tests.bench_worker", "--port", "0", "--worker-id", f"w{i}"],
             logs / f"worker{i}.log")
            for i in range(config.workers)
        ]  # fmt: skip
        workers = worker_set.start_all(specs, config.start_timeout)
        bench.worker_pids = [w.pid for w in workers]
        run = Run(bench, workers, logs)
        direct = Target("direct", "direct", workers[0].url, [])
        direct.meta["what"] = "wrk to worker 0 itself: the floor"
        bench.warm(direct)
        bench.point(direct, "c1", config.low_connections)
        bench.point(direct, "c64", config.high_connections)
        run.targets.append(direct)
        for count in config.processes:
            run.ours(count)
        if config.bare:
            run.bare()
        for peer in config.peers:
            run.peer(peer)
        if config.half_peak and run.rate is not None:
            bench.half_peak(direct, run.rate, direct.points["c1"]["latency_ms"]["50"])
    result = summarize(
        [_target_json(t) for t in run.targets],
        meta={
            "command": "python -m load_tests bench",
            "config": {**asdict(config), "out": str(out)},
            "body_bytes_mean": round(bench.body_mean),
            "half_peak_rps": None if run.rate is None else round(run.rate, 1),
            "machine": bench_sys.machine_info(bench.wrk),
            "notes": run.notes,
            "elapsed_s": round(time.monotonic() - began, 1),
            "logs": str(logs),
        },
    )
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "bench.md").write_text(render_markdown(result), encoding="utf-8")
    console.print(render_table(result))
    for line in result["verdicts"]:
        console.print(line, markup=False, highlight=False)
    console.print(f"report: {out / 'bench.md'}  figures: {out / 'bench.json'}", markup=False)
    return result


def _target_json(target: Target) -> dict[str, Any]:
    return {
        "name": target.name,
        "kind": target.kind,
        "url": target.url,
        "processes": target.processes,
        "meta": target.meta,
        "points": target.points,
    }


# --- command line ----------------------------------------------------------------------------


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def _counts(value: str) -> tuple[int, ...]:
    counts = tuple(int(v) for v in value.split(",") if v.strip())
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"a comma-separated list of counts >= 1, got {value}")
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's flags."""
    defaults = BenchConfig(out=Path("reports/bench"))
    parser.add_argument("--out", type=Path, default=defaults.out, help="report directory")
    parser.add_argument(
        "--duration", type=_positive, default=defaults.duration, help="seconds per point"
    )
    parser.add_argument(
        "--warmup", type=float, default=defaults.warmup, help="seconds of load before a target"
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 s points and 1 s warm-ups (a smoke run)"
    )
    parser.add_argument(
        "--processes", type=_counts, default=defaults.processes, metavar="N[,N...]",
        help="our router's --processes values to measure (default 1,2)",
    )  # fmt: skip
    parser.add_argument(
        "--no-peer", action="store_true", help="do not install or measure sglang-router"
    )
    parser.add_argument(
        "--no-bare", action="store_true", help="skip the bare aiohttp proxy reference"
    )
    parser.add_argument(
        "--no-half-peak", action="store_true", help="skip the rate-limited half-peak points"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="body generator seed")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    duration, warmup = args.duration, args.warmup
    if args.quick:
        duration, warmup = min(duration, 3.0), min(warmup, 1.0)
    return BenchConfig(
        out=args.out,
        duration=duration,
        warmup=warmup,
        processes=args.processes,
        peers=() if args.no_peer else (PEER,),
        bare=not args.no_bare,
        half_peak=not args.no_half_peak,
        seed=args.seed,
    )


def run_cli(args: argparse.Namespace) -> int:
    """``python -m load_tests bench``: 0 when every point ran without errors, 1 otherwise."""
    result = run_bench(config_from_args(args), Console())
    return 0 if result["errors_total"] == 0 else 1
