"""Fixtures: simulated workers as real subprocesses, the router in-process, on 127.0.0.1.

`sims(n, ...)` starts n `prefix-worker sim` processes in parallel on ephemeral ports and stops
them after the test. `router(...)` builds the aiohttp app from a `Settings` and serves it on
an ephemeral port in the test's event loop, so tests can look at its state (in-flight counts,
the pool) while talking to it over real HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from load_tests.procs import ServerProcess, console_script, start, start_many
from load_tests.redis_server import RedisServer
from router.app import create_app
from router.config import Settings
from router.http_server import RouterAppRunner
from router.loads import RedisLoadBoard
from router.state import STATE, RouterState

ADMIN_TOKEN = "test-admin-token"


@dataclass
class Sim:
    worker_id: str
    process: ServerProcess
    argv: list[str]

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def state(self) -> dict[str, Any]:
        return httpx.get(self.url + "/sim/state", timeout=5).json()  # type: ignore[no-any-return]

    def requests(self, limit: int = 100) -> list[dict[str, Any]]:
        answer = httpx.get(self.url + f"/sim/requests?limit={limit}", timeout=5).json()
        return answer["requests"] if isinstance(answer, dict) else answer  # type: ignore[no-any-return]


SimFactory = Callable[..., list[Sim]]


def sim_argv(worker_id: str, port: int = 0, **options: Any) -> list[str]:
    argv = [*console_script("prefix-worker"), "sim", "--port", str(port), "--worker-id", worker_id]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


@pytest.fixture
def sims(tmp_path: Path) -> Iterator[SimFactory]:
    running: list[Sim] = []

    def make(n: int, **options: Any) -> list[Sim]:
        first = len(running)
        specs = []
        for i in range(first, first + n):
            argv = sim_argv(f"w{i}", **options)
            specs.append((f"sim-w{i}", argv, tmp_path / f"sim-w{i}.log"))
        started = start_many(specs)
        new = [
            Sim(f"w{i}", proc, list(spec[1]))
            for i, proc, spec in zip(range(first, first + n), started, specs, strict=True)
        ]
        running.extend(new)
        return new

    yield make
    for sim in running:
        sim.process.stop()


def restart_sim(sim: Sim, tmp_path: Path) -> None:
    """Start a stopped simulator again on the same port (a worker coming back)."""
    argv = list(sim.argv)
    argv[argv.index("--port") + 1] = str(sim.port)
    sim.process = start(f"sim-{sim.worker_id}-again", argv, log_path=tmp_path / "again.log")


def settings_for(sims: list[Sim], **sections: Any) -> Settings:
    data: dict[str, Any] = {
        "server": {"admin_token": ADMIN_TOKEN, "admin_on_public_port": True},
        "workers": [{"id": s.worker_id, "url": s.url} for s in sims],
        "tenants": {"salt_secret": "integration-secret"},
        "health": {"probe_interval_s": 0.2, "probe_timeout_s": 1.0, "eject_base_s": 0.5},
        "telemetry": {"access_log": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values
    return Settings.model_validate(data)


class RouterTestServer(TestServer):
    """aiohttp's test server on the router's own runner (`router.http_server`), so in-process
    tests see the HTTP-level behaviour that `prefix-router serve` has."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return RouterAppRunner(self.app, **kwargs)


@dataclass
class RunningRouter:
    url: str
    state: RouterState
    server: TestServer

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


RouterFactory = Callable[..., Awaitable[RunningRouter]]
"""``make(settings, **app_options)``: options go to `create_app` (tracing, resolver ...)."""


@pytest.fixture
async def router() -> AsyncIterator[RouterFactory]:
    servers: list[TestServer] = []

    async def make(settings: Settings, **app_options: Any) -> RunningRouter:
        app = create_app(settings, **app_options)
        server = RouterTestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        return RunningRouter(str(server.make_url("")).rstrip("/"), app[STATE], server)

    yield make
    for server in servers:
        await server.close()


Boards = Callable[..., Awaitable[RedisLoadBoard]]
"""``make(replica_id, **settings)``: a started `RedisLoadBoard` on the test's Redis."""


@pytest.fixture
async def redis_boards(redis_server: RedisServer) -> AsyncIterator[Boards]:
    """Load boards on the test's redis-server, each closed (its counts withdrawn) at the end."""
    opened: list[RedisLoadBoard] = []

    async def make(replica_id: str, **settings: Any) -> RedisLoadBoard:
        board = RedisLoadBoard(redis_server.url, replica_id=replica_id, **settings)
        await board.start()
        opened.append(board)
        return board

    yield make
    for board in opened:
        await board.close()


async def redis_dump(url: str) -> dict[bytes, Any]:
    """Every key in Redis and its value (hashes and sets as read)."""
    client = aioredis.Redis.from_url(url)
    try:
        dump: dict[bytes, Any] = {}
        async for key in client.scan_iter():
            kind = await client.type(key)
            if kind == b"hash":
                dump[key] = await client.hgetall(key)
            elif kind == b"set":
                dump[key] = await client.smembers(key)
            else:
                dump[key] = await client.dump(key)
        return dump
    finally:
        await client.aclose()


def chat_body(system: str, user: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": 4,
        **extra,
    }


def metric_value(exposition: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``, from /metrics text."""
    total = 0.0
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def poll(condition: Callable[[], bool], *, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Wait until ``condition()`` holds, failing the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


async def apoll(
    condition: Callable[[], Awaitable[bool]], *, within: float = 10.0, interval: float = 0.05
) -> None:
    """Async `poll`: awaits ``condition()`` until it holds, failing after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


async def set_fault(sim: Sim, **fault: Any) -> None:
    """Ask a simulator to misbehave (see docs/simulator.md for the modes)."""
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.post(sim.url + "/sim/fault", json=fault)
        response.raise_for_status()
