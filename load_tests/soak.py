"""Soak test: a steady load for a bounded time, watching the router's resources for leaks.

``python -m load_tests soak --duration 600 --rate 20 --out reports/soak`` starts simulated
workers, a redis-server and the router (real subprocesses on loopback; the router with the
Redis warm index and load board, as deployed), drives synthetic tenants at a steady Poisson
rate (Zipf popularity, growing conversations, prefix versions changing now and then, so the
warm index keeps seeing new chains and must evict) and stops by itself after ``duration``.

Every ``sample_interval`` seconds it reads the router's ``GET /admin/stats`` (RSS, open file
descriptors, asyncio tasks, in-flight requests, warm-index blocks per worker) and Redis's RSS.
It writes ``soak.json`` (config, samples, request counts, verdict), ``soak.md`` and
``soak.png``.

The verdict (`load_tests.soak_verdict.judge`): after a warm-up every series must flatten,
RSS must grow by less than a few percent over the last half, and the task count must come
back to its idle level once the load has drained.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.console import Console

from load_tests import procs
from load_tests.client import send_request
from load_tests.demo import ADMIN_TOKEN, ProcessSet, wait_until_routable
from load_tests.records import RequestRecord
from load_tests.redis_server import RedisServer
from load_tests.soak_verdict import SERIES, judge, write_markdown, write_plot
from load_tests.workload import TraceRequest, WorkloadConfig, WorkloadGenerator


@dataclass(frozen=True, slots=True)
class SoakConfig:
    """What a soak runs, and the thresholds of its verdict."""

    out: Path
    duration: float = 600.0
    rate: float = 20.0
    """Mean requests per second (no bursts: a steady rate)."""
    seed: int = 11
    workers: int = 2
    tenants: int = 64
    head_tokens: tuple[int, int] = (400, 1600)
    cache_blocks: int = 1024
    """KV blocks per simulated worker: the heads together exceed it, so the index evicts."""
    concurrency: int = 64
    sample_interval: float = 5.0
    warmup_fraction: float = 0.1
    """Share of the run (at least one sample interval) left out of the verdict."""
    rss_growth_limit: float = 0.05
    flat_fraction: float = 0.02
    flat_count: float = 8.0
    idle_task_slack: int = 5
    model: str = "sim-model"
    start_timeout: float = 30.0

    def workload(self) -> WorkloadConfig:
        return WorkloadConfig(
            seed=self.seed,
            tenants=self.tenants,
            zipf_exponent=0.8,
            head_tokens=self.head_tokens,
            rate=self.rate,
            duration=self.duration,
            burst_every=0.0,
            version_every=10.0,
            stream_fraction=0.7,
            max_tokens=(4, 16),
            model=self.model,
        )


@dataclass(slots=True)
class Tally:
    """Request outcomes, aggregated as they complete (a soak keeps no per-request records)."""

    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    not_sent: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    latencies: list[float] = field(default_factory=list)

    def add(self, record: RequestRecord) -> None:
        if record.ok:
            self.ok += 1
            self.prompt_tokens += record.prompt_tokens or 0
            self.cached_tokens += record.cached_tokens or 0
            self.latencies.append(record.latency or 0.0)
        else:
            self.errors[(record.error or f"http {record.status}")[:80]] += 1

    def to_json(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return round(ordered[int(q * (len(ordered) - 1))], 4) if ordered else None

        return {
            "sent": self.sent,
            "ok": self.ok,
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors.most_common(10)),
            "not_sent": self.not_sent,
            "cached_ratio": round(self.cached_tokens / self.prompt_tokens, 4)
            if self.prompt_tokens
            else None,
            "latency_p50_s": pct(0.5),
            "latency_p99_s": pct(0.99),
        }


# --- processes ---------------------------------------------------------------------------


def rss_of(pid: int) -> int | None:
    """Resident bytes of a process from /proc (None if it is gone or not Linux)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def router_config(
    workers: Sequence[tuple[str, str]], api_keys: dict[str, str], redis_url: str
) -> dict[str, Any]:
    return {
        # The harness samples /admin/stats on the router's one (loopback) port.
        "server": {"host": "127.0.0.1", "admin_token": ADMIN_TOKEN, "admin_on_public_port": True},
        "workers": [{"id": wid, "url": url} for wid, url in workers],
        "tenants": {
            "salt_secret": "soak-secret",
            "api_keys": [{"key": key, "tenant": t} for t, key in sorted(api_keys.items())],
        },
        "index": {"kind": "redis"},
        "loads": {"kind": "redis"},
        "redis": {"url": redis_url},
        "telemetry": {"access_log": False, "log_level": "warning"},
    }


# --- load and sampling -------------------------------------------------------------------


async def _sample(
    admin: httpx.AsyncClient, t0: float, redis_pid: int, tally: Tally
) -> dict[str, Any] | None:
    try:
        resp = await admin.get("/admin/stats", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        resp.raise_for_status()
        stats: dict[str, Any] = resp.json()
    except (httpx.HTTPError, ValueError):
        return None
    return {
        "t": round(time.monotonic() - t0, 2),
        **{name: stats.get(name) for name in (*SERIES, "inflight")},
        "index_blocks": stats.get("index_blocks"),
        "redis_rss_bytes": rss_of(redis_pid),
        "requests_done": tally.ok + sum(tally.errors.values()),
    }


async def _sampler(
    admin: httpx.AsyncClient,
    config: SoakConfig,
    t0: float,
    redis_pid: int,
    tally: Tally,
    samples: list[dict[str, Any]],
    stop: asyncio.Event,
) -> None:
    while not stop.is_set():
        sample = await _sample(admin, t0, redis_pid, tally)
        if sample is not None:
            samples.append(sample)
        try:
            async with asyncio.timeout(config.sample_interval):
                await stop.wait()
        except TimeoutError:
            pass


async def drive(
    router_url: str, config: SoakConfig, redis_pid: int, console: Console
) -> tuple[Tally, list[dict[str, Any]], dict[str, Any] | None, dict[str, Any] | None]:
    """Send the workload for ``config.duration`` seconds while sampling; returns the tally,
    the samples, and two idle samples: before the load and after it has fully drained."""
    tally = Tally()
    samples: list[dict[str, Any]] = []
    client = httpx.AsyncClient(
        base_url=router_url,
        limits=httpx.Limits(max_connections=config.concurrency),
        timeout=httpx.Timeout(30.0, connect=5.0),
        trust_env=False,
    )
    async with httpx.AsyncClient(base_url=router_url, timeout=5.0, trust_env=False) as admin:
        t0 = time.monotonic()
        idle_before = await _sample(admin, t0, redis_pid, tally)
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sampler(admin, config, t0, redis_pid, tally, samples, stop))
        try:
            await _send_all(client, config, t0, tally, samples, console)
        finally:
            stop.set()
            await sampler
            # The client's keep-alive connections each hold a handler task in the router:
            # close them first, so "idle" compares like with like (only the admin connection).
            await client.aclose()
        final = await _sample(admin, t0, redis_pid, tally)
        if final is not None:
            samples.append(final)
        idle_after = await _idle_sample(admin, t0, redis_pid, tally)
    return tally, samples, idle_before, idle_after


async def _send_all(
    client: httpx.AsyncClient,
    config: SoakConfig,
    t0: float,
    tally: Tally,
    samples: list[dict[str, Any]],
    console: Console,
) -> None:
    """Open-loop Poisson sends until the deadline (at most ``concurrency`` in flight), then
    wait (bounded) for the requests still running."""
    slots = asyncio.Semaphore(config.concurrency)
    tasks: set[asyncio.Task[None]] = set()
    end = t0 + config.duration
    last_line = t0

    async def one(request: TraceRequest, body: bytes) -> None:
        record = RequestRecord(
            index=request.index, tenant=request.tenant, path=request.path,
            stream=request.stream, conversation=request.conversation, turn=request.turn,
            prefix_version=request.prefix_version, scheduled=request.offset,
        )  # fmt: skip
        try:
            await send_request(
                client, request, body, record, t0=t0,
                request_id=f"soak-{request.index}", extra_headers={},
            )  # fmt: skip
            tally.add(record)
        finally:
            slots.release()

    try:
        for request in WorkloadGenerator(config.workload()):
            delay = t0 + request.offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() >= end:
                break
            try:
                async with asyncio.timeout(max(0.0, end - time.monotonic())):
                    await slots.acquire()
            except TimeoutError:
                tally.not_sent += 1
                break
            tally.sent += 1
            body = json.dumps(request.body, separators=(",", ":")).encode()
            task = asyncio.create_task(one(request, body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if time.monotonic() - last_line >= 30.0:
                last_line = time.monotonic()
                _progress(console, last_line - t0, tally, samples[-1] if samples else {})
        if tasks:
            await asyncio.wait(set(tasks), timeout=30.0)
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _progress(console: Console, t: float, tally: Tally, last: dict[str, Any]) -> None:
    console.print(
        f"  t={t:5.0f}s sent {tally.sent} ok {tally.ok} errors {sum(tally.errors.values())} "
        f"rss {(last.get('rss_bytes') or 0) / 2**20:.1f} MiB fds {last.get('open_fds')} "
        f"tasks {last.get('asyncio_tasks')} index {last.get('index_blocks_total')}",
        highlight=False,
        markup=False,
    )


async def _idle_sample(
    admin: httpx.AsyncClient, t0: float, redis_pid: int, tally: Tally
) -> dict[str, Any] | None:
    """A sample once the router has no request in flight (polled, with a deadline)."""
    deadline = time.monotonic() + 10.0
    sample = None
    while time.monotonic() < deadline:
        sample = await _sample(admin, t0, redis_pid, tally)
        if sample is not None and sample["inflight"] == 0:
            return sample
        await asyncio.sleep(0.1)
    return sample


def run_soak(config: SoakConfig, console: Console | None = None) -> dict[str, Any]:
    """Start everything, soak, stop everything, write soak.json/.md/.png; return the result."""
    console = console or Console()
    out = config.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="prefix-router-soak-"))
    began = time.time()
    redis = RedisServer(scratch, log_path=logs / "redis.log")
    redis.start()
    try:
        with ProcessSet(console) as processes:
            ids = [f"w{i}" for i in range(config.workers)]
            sims = processes.start_all(
                [
                    (
                        f"sim-{wid}",
                        [
                            *procs.console_script("prefix-worker"),
                            "sim",
                            "--port",
                            "0",
                            "--worker-id",
                            wid,
                            "--cache-blocks",
                            str(config.cache_blocks),
                            "--model",
                            config.model,
                            "--log-level",
                            "warning",
                        ],  # fmt: skip
                        logs / f"sim-{wid}.log",
                    )
                    for wid in ids
                ],
                config.start_timeout,
            )
            keys = {t.id: t.api_key for t in WorkloadGenerator(config.workload()).tenants}
            workers = [(wid, s.url) for wid, s in zip(ids, sims, strict=True)]
            cfg_path = scratch / "router.yaml"
            cfg_path.write_text(yaml.safe_dump(router_config(workers, keys, redis.url)))
            argv = [*procs.console_script("prefix-router"), "serve", "--config", str(cfg_path),
                    "--port", "0"]  # fmt: skip
            (router,) = processes.start_all(
                [("router", argv, logs / "router.log")], config.start_timeout
            )
            wait_until_routable(router.url, config.workers)
            console.print(
                f"soak: {config.duration:.0f}s at {config.rate}/s", highlight=False, markup=False
            )
            tally, samples, idle_before, idle_after = asyncio.run(
                drive(router.url, config, redis.pid, console)
            )
            router_alive = router.alive()
            pids = {p.name: p.pid for p in (*sims, router)} | {"redis": redis.pid}
    finally:
        redis.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    verdict = judge(samples, config, idle_before, idle_after)
    verdict["router_alive_at_end"] = router_alive
    verdict["ok"] &= router_alive
    result = {
        "command": f"python -m load_tests soak --duration {config.duration:g} "
        f"--rate {config.rate:g} --out {out}",
        "config": {**asdict(config), "out": str(out)},
        "started_at": began,
        "elapsed_s": round(time.time() - began, 1),
        "requests": tally.to_json(),
        "pids": pids,
        "idle_before": idle_before,
        "idle_after": idle_after,
        "verdict": verdict,
        "samples": samples,
    }
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    write_markdown(out / "soak.md", result)
    write_plot(out / "soak.png", samples)
    console.print(
        f"soak {'flat' if verdict['ok'] else 'GROWING'}: {out / 'soak.md'}",
        highlight=False,
        markup=False,
    )
    return result
