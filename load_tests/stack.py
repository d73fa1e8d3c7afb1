"""Brings up one target's whole stack on loopback, for one run, and tears it down.

A stack is fresh simulated workers (the scenario's initial ones plus its spares), Redis
when our router's settings ask for it, and the router under test: ours in one policy, or a
peer router from PyPI in one of its policies, as many replicas as the scenario says. Every
target gets its own fresh workers, so no run inherits another's warm cache.

Churn events are applied the way an operator's automation would: our router through its
admin API (``POST /admin/workers``, ``DELETE /admin/workers/{id}``), a peer through its
own worker-management API, a crash by killing the worker's process.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.console import Console

from load_tests import procs
from load_tests.demo import ADMIN_TOKEN, ProcessSet, router_config, wait_until_routable
from load_tests.redis_server import RedisServer
from load_tests.scenarios import ChurnEvent, Scenario

OURS = "prefix-router"


@dataclass(frozen=True, slots=True)
class Target:
    """What a run drives: our router in ``policy``, or the peer ``router`` in ``policy``.

    ``tuning`` (ours only) overrides routing thresholds, e.g. the offline tuner's
    recommendation; such a run is labelled ``policy@name=value,...``.
    """

    router: str
    policy: str
    tuning: tuple[tuple[str, float], ...] = ()

    @property
    def label(self) -> str:
        if self.router != OURS:
            return f"{self.router}/{self.policy}"
        if not self.tuning:
            return self.policy
        return self.policy + "@" + ",".join(f"{k}={v:g}" for k, v in self.tuning)

    @property
    def ours(self) -> bool:
        return self.router == OURS


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class Stack:
    """The processes of one run (a context manager: everything stops on exit)."""

    def __init__(
        self,
        scenario: Scenario,
        target: Target,
        *,
        api_keys: Mapping[str, str],
        logs: Path,
        console: Console,
        start_timeout: float = 30.0,
    ) -> None:
        self.scenario = scenario
        self.target = target
        self._api_keys = dict(api_keys)
        self._logs = logs
        self._console = console
        self._timeout = start_timeout
        self._processes = ProcessSet(console)
        self._peer_handles: list[procs.ServerProcess] = []
        self._redis: RedisServer | None = None
        self._scratch = Path(tempfile.mkdtemp(prefix="prefix-router-stack-"))
        self.sims: dict[str, procs.ServerProcess] = {}
        self.router_urls: list[str] = []
        self.processes: list[dict[str, Any]] = []
        self.churn_log: list[dict[str, Any]] = []

    # --- bring-up ------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        try:
            self._start_sims()
            if self.target.ours:
                self._start_ours()
            else:
                self._start_peer()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tag(self) -> str:
        return self.target.label.replace("/", "-")

    def _start_sims(self) -> None:
        s = self.scenario
        specs = []
        for wid in s.worker_ids:
            argv = [
                *procs.console_script("prefix-worker"), "sim", "--port", "0",
                "--worker-id", wid, "--model", s.workload.model,
                "--cache-blocks", str(s.cache_blocks), "--block-size", str(s.block_size),
                "--prefill-us-per-token", str(s.prefill_us_per_token),
                "--decode-ms-per-token", str(s.decode_ms_per_token),
                "--max-running", str(s.max_running),
            ]  # fmt: skip
            specs.append((f"{self._tag()}/{wid}", argv, self._logs / f"{self._tag()}-{wid}.log"))
        started = self._processes.start_all(specs, self._timeout)
        self.sims = dict(zip(s.worker_ids, started, strict=True))
        self._record(started)

    @property
    def initial_workers(self) -> list[tuple[str, str]]:
        ids = self.scenario.worker_ids[: self.scenario.workers]
        return [(wid, self.sims[wid].url) for wid in ids]

    def _start_ours(self) -> None:
        s = self.scenario
        config = router_config(self.initial_workers, self.target.policy, self._api_keys)
        config = _merge(config, s.router_settings)
        if self.target.tuning:
            config = _merge(config, {"routing": dict(self.target.tuning)})
        # Clients are load generators: no tenant limit. Decisions in headers for the report.
        config = _merge(config, {"telemetry": {"access_log": False}})
        needs_redis = any(
            config.get(section, {}).get("kind") == "redis" for section in ("index", "loads")
        )
        if needs_redis:
            workdir = self._scratch / "redis"
            workdir.mkdir()
            self._redis = RedisServer(workdir, log_path=self._logs / f"{self._tag()}-redis.log")
            self._redis.start()
            config = _merge(config, {"redis": {"url": self._redis.url}})
        path = self._scratch / "router.yaml"
        path.write_text(yaml.safe_dump(config))
        argv = [*procs.console_script(OURS), "serve", "--config", str(path), "--port", "0"]
        specs = [
            (f"{self._tag()}/router{i}", argv, self._logs / f"{self._tag()}-router{i}.log")
            for i in range(s.replicas)
        ]
        routers = self._processes.start_all(specs, self._timeout)
        self._record(routers)
        for router in routers:
            wait_until_routable(router.url, s.workers)
        self.router_urls = [r.url for r in routers]

    def _start_peer(self) -> None:
        from load_tests import peers

        urls = [url for _, url in self.initial_workers]
        for i in range(self.scenario.replicas):
            handle = peers.launch_peer(
                self.target.router,
                self.target.policy,
                urls,
                log_path=self._logs / f"{self._tag()}-router{i}.log",
            )
            self._peer_handles.append(handle)
            self._record([handle])
        self.router_urls = [h.url for h in self._peer_handles]

    def _record(self, started: Sequence[procs.ServerProcess]) -> None:
        self.processes += [
            {"name": p.name, "pid": p.pid, "argv": p.argv, "log": str(p.log_path)} for p in started
        ]

    # --- churn ---------------------------------------------------------------------------

    async def apply(self, event: ChurnEvent) -> None:
        """Apply one churn event to every replica (never raises: the outcome is logged)."""
        worker = self.sims[event.worker]
        outcome = "ok"
        try:
            if event.action == "crash":
                worker.kill()
            elif self.target.ours:
                await self._ours_membership(event.action, event.worker, worker.url)
            else:
                await self._peer_membership(event.action, worker.url)
        except Exception as exc:  # the run goes on; the report says what failed
            outcome = f"{type(exc).__name__}: {exc}"[:200]
        self.churn_log.append({**_event_json(event), "outcome": outcome})

    async def _ours_membership(self, action: str, worker_id: str, url: str) -> None:
        headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            for base in self.router_urls:
                if action == "add":
                    resp = await client.post(
                        base + "/admin/workers", json={"id": worker_id, "url": url}, headers=headers
                    )
                else:
                    path = f"/admin/workers/{worker_id}"
                    resp = await client.delete(base + path, headers=headers)
                resp.raise_for_status()

    async def _peer_membership(self, action: str, url: str) -> None:
        from load_tests import peers

        change = peers.add_worker if action == "add" else peers.remove_worker
        await asyncio.gather(*(change(base, url) for base in self.router_urls))

    async def drive_churn(self, started: asyncio.Event) -> None:
        """Apply the scenario's churn events at their times, counted from ``started``."""
        await started.wait()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for event in sorted(self.scenario.churn, key=lambda e: e.at):
            delay = t0 + event.at * self.scenario.duration - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.apply(event)

    async def insights(self) -> dict[str, Any] | None:
        """Our router's ``GET /admin/insights`` (first replica), None for a peer or on error."""
        if not self.target.ours or not self.router_urls:
            return None
        headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        try:
            async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
                resp = await client.get(self.router_urls[0] + "/admin/insights", headers=headers)
                resp.raise_for_status()
                data = resp.json()
        except (httpx.HTTPError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    # --- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        for handle in self._peer_handles:
            with contextlib.suppress(Exception):
                handle.stop()
        self._peer_handles = []
        self._processes.stop_all()
        if self._redis is not None:
            self._redis.stop()
            self._redis = None
        shutil.rmtree(self._scratch, ignore_errors=True)


def _event_json(event: ChurnEvent) -> dict[str, Any]:
    return {"at": event.at, "action": event.action, "worker": event.worker}
