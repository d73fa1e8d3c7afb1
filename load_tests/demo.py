"""`make demo`: the same trace through the router under round robin, then cache-aware.

For each policy the demo starts fresh simulated workers and a router (config in a temporary
directory: the workers, the policy, the tenants' API keys, an admin token; everything else
on the router's defaults), drives one seeded trace through it, stops every process, and
finally writes a report comparing the policies.

The workload is sized to show what the router is for: the tenants' prompt heads together
exceed one worker's KV cache but fit in the cluster's (defaults: 48 tenants with heads of
3,000-6,000 tokens, ~2.2x one worker's 6,144 blocks and ~0.55x the four workers'). Spread
round robin, every worker sees every tenant and its LRU cache thrashes; with affinity each
tenant stays warm on its own worker. Popularity is Zipf (exponent 0.6: a few hot tenants
that bounded load must spill, and a long tail that round robin cannot keep warm). The
sizes were tuned on a 2-core machine so that one run of the demo takes about 80 s.

Every process started is stopped on success, failure and Ctrl-C (each runs in its own
process group, and a batch that fails to start is killed as a whole).
Their stderr goes to ``OUT/logs/``.
"""

from __future__ import annotations

import asyncio
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.console import Console

from load_tests import procs
from load_tests.client import RunOptions, run_trace
from load_tests.records import RunResult, write_run
from load_tests.report import comparison_table, write_report
from load_tests.tenants import BYTES_PER_TOKEN, build_head
from load_tests.workload import (
    Trace,
    WorkloadConfig,
    WorkloadGenerator,
    generate_trace,
    summarize_trace,
    write_trace,
)

ADMIN_TOKEN = "demo-admin"
POLICIES: tuple[str, ...] = ("round_robin", "cache_aware")


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """What the demo runs. The defaults are the sizes `make demo` is tuned for."""

    out: Path
    seed: int = 7
    duration: float = 35.0
    """Seconds of traffic per policy."""
    workers: int = 4
    policies: tuple[str, ...] = POLICIES
    cache_blocks: int = 6144
    """KV blocks per simulated worker (of ``block_size`` tokens)."""
    block_size: int = 16
    tenants: int = 48
    zipf_exponent: float = 0.6
    head_tokens: tuple[int, int] = (3000, 6000)
    """Range of the tenants' head sizes. With the defaults the heads total ~2.2x one worker's
    cache and ~0.55x the cluster's (see ``sizing`` in summary.json)."""
    rate: float = 30.0
    """Mean requests per second (bursts go higher)."""
    stream_fraction: float = 0.9
    """Share of streaming requests (interactive chat streams; batch jobs do not)."""
    concurrency: int = 64
    model: str = "sim-model"
    start_timeout: float = 30.0

    def workload(self) -> WorkloadConfig:
        return WorkloadConfig(
            seed=self.seed,
            tenants=self.tenants,
            zipf_exponent=self.zipf_exponent,
            head_tokens=self.head_tokens,
            rate=self.rate,
            duration=self.duration,
            stream_fraction=self.stream_fraction,
            model=self.model,
        )


def router_config(
    workers: Sequence[tuple[str, str]], policy: str, api_keys: Mapping[str, str]
) -> dict[str, Any]:
    """The router's YAML config: workers, policy, tenant keys, admin token; nothing else."""
    return {
        "server": {"host": "127.0.0.1", "admin_token": ADMIN_TOKEN, "admin_on_public_port": True},
        "workers": [{"id": wid, "url": url} for wid, url in workers],
        "routing": {"policy": policy},
        "tenants": {
            "api_keys": [{"key": key, "tenant": tenant} for tenant, key in sorted(api_keys.items())]
        },
    }


class ProcessSet:
    """Owns server subprocesses: starts them together, stops every one of them on exit."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._servers: list[procs.ServerProcess] = []

    def start_all(
        self, specs: Sequence[tuple[str, list[str], Path]], timeout: float
    ) -> list[procs.ServerProcess]:
        """Start ``(name, argv, log_path)`` processes in parallel; wait for all to listen.

        All or none: if one fails (or Ctrl-C comes) while starting, `procs.start_many` kills
        the whole batch before raising.
        """
        started = procs.start_many(specs, timeout=timeout)
        self._servers.extend(started)
        for server in started:
            self._console.print(
                f"  started {server.name} at {server.url} "
                f"(pid {server.pid}, stderr -> {server.log_path})",
                highlight=False,
                markup=False,
            )
        return started

    def stop_all(self) -> None:
        """Stop every process started (safe to call more than once).

        A second Ctrl-C while stopping does not strand the rest: it is noted, the remaining
        processes are still stopped, and it is raised again at the end.
        """
        interrupted = False
        while self._servers:
            server = self._servers.pop()
            try:
                server.stop(timeout=5.0)
            except KeyboardInterrupt:
                interrupted = True
                server.kill()
            except Exception as exc:
                self._console.print(
                    f"  could not stop {server.name}: {exc}", highlight=False, markup=False
                )
                server.kill()
        if interrupted:
            raise KeyboardInterrupt

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def wait_until_routable(router_url: str, expected: int, timeout: float = 15.0) -> None:
    """Poll the admin API until the router sees ``expected`` healthy workers (deadline)."""
    deadline = time.monotonic() + timeout
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    last = "no answer"
    with httpx.Client(base_url=router_url, timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            try:
                resp = client.get("/admin/workers", headers=headers)
                if resp.status_code == 200:
                    healthy = sum(bool(w.get("healthy")) for w in resp.json()["workers"])
                    if healthy >= expected:
                        return
                    last = f"{healthy}/{expected} healthy"
                else:
                    last = f"HTTP {resp.status_code}"
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                last = str(exc)
            time.sleep(0.1)  # polling with a deadline, not waiting blind
    raise procs.ProcessStartError(f"router never saw {expected} healthy workers ({last})")


@contextmanager
def _phase(text: str, timings: dict[str, float]) -> Iterator[None]:
    start = time.monotonic()
    yield
    timings[text] = round(time.monotonic() - start, 2)


def run_policy(
    policy: str,
    trace: Trace,
    config: DemoConfig,
    *,
    logs: Path,
    scratch: Path,
    console: Console,
) -> RunResult:
    """Fresh workers and router for ``policy``, the trace through it, everything stopped."""
    console.rule(f"[bold]{policy}")
    worker_ids = [f"w{i}" for i in range(config.workers)]
    sim_specs = []
    for wid in worker_ids:
        argv = [
            *procs.console_script("prefix-worker"), "sim", "--port", "0", "--worker-id", wid,
            "--cache-blocks", str(config.cache_blocks), "--block-size", str(config.block_size),
            "--model", config.model,
        ]  # fmt: skip
        sim_specs.append((f"{policy}/{wid}", argv, logs / f"{policy}-{wid}.log"))
    with ProcessSet(console) as processes:
        sims = processes.start_all(sim_specs, config.start_timeout)
        cfg_path = scratch / f"router-{policy}.yaml"
        workers = [(wid, sim.url) for wid, sim in zip(worker_ids, sims, strict=True)]
        cfg_path.write_text(yaml.safe_dump(router_config(workers, policy, trace.tenants)))
        router_argv = [
            *procs.console_script("prefix-router"), "serve", "--config", str(cfg_path),
            "--port", "0",
        ]  # fmt: skip
        (router,) = processes.start_all(
            [(f"{policy}/router", router_argv, logs / f"{policy}-router.log")],
            config.start_timeout,
        )
        wait_until_routable(router.url, config.workers)
        options = RunOptions(
            concurrency=config.concurrency,
            duration=config.duration,
            admin_token=ADMIN_TOKEN,
            drain_timeout=15.0,
        )
        run = asyncio.run(
            run_trace(trace.requests, router.url, label=policy, options=options, console=console)
        )
    run.meta.update(
        {
            "policy": policy,
            "workers": dict(workers),
            "processes": [
                {"name": p.name, "pid": p.pid, "argv": p.argv, "log": str(p.log_path)}
                for p in (*sims, router)
            ],
        }
    )
    return run


def _sizing(trace: Trace, config: DemoConfig) -> dict[str, Any]:
    """How the tenants' heads compare with one worker's cache and the cluster's."""
    generator = WorkloadGenerator(config.workload())
    seen = set(trace.tenants)
    head_tokens = sum(
        len(build_head(t, 0).text().encode()) // BYTES_PER_TOKEN
        for t in generator.tenants
        if t.id in seen
    )
    head_blocks = head_tokens // config.block_size
    return {
        "heads_tokens": head_tokens,
        "heads_blocks": head_blocks,
        "worker_cache_blocks": config.cache_blocks,
        "cluster_cache_blocks": config.cache_blocks * config.workers,
        "heads_over_worker_cache": round(head_blocks / config.cache_blocks, 2),
        "heads_over_cluster_cache": round(head_blocks / (config.cache_blocks * config.workers), 2),
    }


def run_demo(config: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    """Run every policy on one trace, write the report into ``config.out``, return it."""
    console = console or Console()
    began = time.monotonic()
    out = config.out
    logs = out / "logs"
    runs_dir = out / "runs"
    for directory in (out, logs, runs_dir):
        directory.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    with _phase("trace", timings):
        trace = generate_trace(config.workload())
        write_trace(out / "trace.jsonl.gz", trace)
    sizing = _sizing(trace, config)
    console.print(
        f"trace: {len(trace.requests)} requests from {len(trace.tenants)} tenants over "
        f"{config.duration:.0f}s; heads ~{sizing['heads_blocks']} blocks vs "
        f"{config.cache_blocks} per worker, {sizing['cluster_cache_blocks']} in the cluster",
        highlight=False,
        markup=False,
    )
    console.print(f"process logs: {logs}/<policy>-<process>.log", highlight=False, markup=False)
    for policy in config.policies:
        for old in logs.glob(f"{policy}-*.log"):
            old.unlink()
    runs: list[RunResult] = []
    scratch = Path(tempfile.mkdtemp(prefix="prefix-router-demo-"))
    try:
        for policy in config.policies:
            with _phase(policy, timings):
                run = run_policy(policy, trace, config, logs=logs, scratch=scratch, console=console)
            write_run(runs_dir / f"{policy}.jsonl.gz", run)
            runs.append(run)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    trace_summary = summarize_trace(trace.requests)
    trace_summary.pop("by_tenant", None)  # per-tenant counts are in the trace file
    meta = {
        "command": "python -m load_tests demo",
        "config": {**asdict(config), "out": str(out)},
        "trace": trace_summary,
        "sizing": sizing,
        "router_config": "workers, routing.policy, tenants.api_keys, server.admin_token; "
        "everything else on the router's defaults",
        "phases_s": timings,
        "elapsed_s": round(time.monotonic() - began, 2),
        "python": platform.python_version(),
        "logs": str(logs),
    }
    summary = write_report(out, runs, meta)
    console.print(comparison_table(summary))
    console.print(
        f"report: {out / 'report.md'}  summary: {out / 'summary.json'}",
        highlight=False,
        markup=False,
    )
    return summary
