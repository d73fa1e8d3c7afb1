"""Limits a client runs into: per-tenant concurrency (429), header and body size, and the admin
API kept off the public port when it has its own listener."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from load_tests.procs import ServerProcess, console_script, start
from tests.fuzz.conftest import raw_exchange
from tests.integration.conftest import (
    RouterFactory,
    SimFactory,
    apoll,
    chat_body,
    metric_value,
    router,
    set_fault,
    settings_for,
    sim_argv,
    sims,
)

__all__ = ["router", "sims"]  # fixtures, used by name

KEYS = {
    "api_keys": [{"key": "sk-alpha", "tenant": "alpha"}, {"key": "sk-beta", "tenant": "beta"}],
    "max_concurrent_per_tenant": 2,
}
ALPHA = {"Authorization": "Bearer sk-alpha"}
BETA = {"Authorization": "Bearer sk-beta"}
ADMIN_TOKEN = "limits-admin-token"


async def test_tenant_over_its_concurrency_limit_gets_429(
    sims: SimFactory,
    router: RouterFactory,
) -> None:
    """A tenant at its in-flight limit gets 429 + Retry-After; another tenant is still served."""
    (worker,) = sims(1)
    running = await router(settings_for([worker], tenants=KEYS))
    # The worker holds the next two requests open (both alpha's), until they are cancelled.
    await set_fault(worker, mode="hang", count=2)
    body = chat_body("limits", "q")
    async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
        held = [
            asyncio.create_task(client.post("/v1/chat/completions", json=body, headers=ALPHA))
            for _ in range(2)
        ]

        async def both_held() -> bool:
            return running.state.tenant_gate.inflight("alpha") == 2 and len(worker.requests()) == 2

        try:
            await apoll(both_held)
            refused = await client.post("/v1/chat/completions", json=body, headers=ALPHA)
            other = await client.post("/v1/chat/completions", json=body, headers=BETA)
            metrics = (await client.get("/metrics")).text
        finally:
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert other.status_code == 200
    assert metric_value(metrics, "prefix_router_rate_limited_total", tenant="alpha") == 1
    assert metric_value(metrics, "prefix_router_rate_limited_total", tenant="beta") == 0


def _admin_url(log_path: Path) -> str:
    """The admin listener's URL, from the router's ``admin API listening`` log line."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("msg") == "admin API listening":
                    return str(entry["url"])
        time.sleep(0.05)
    raise AssertionError("no 'admin API listening' line in the router log")


def serve_router(tmp: Path, config: dict[str, Any]) -> ServerProcess:
    path = tmp / "router.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [*console_script("prefix-router"), "serve", "--config", str(path)]
    return start("router-limits", argv, log_path=tmp / "router.log")


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    """A router subprocess with small header/body limits and an admin listener on port 0."""
    tmp = tmp_path_factory.mktemp("limits")
    sim = start("sim-limits", sim_argv("w0"), log_path=tmp / "sim.log")
    config = {
        "server": {
            "port": 0,
            "admin_token": ADMIN_TOKEN,
            "admin_port": 0,
            "max_body_bytes": 4096,
            "max_header_bytes": 1024,
            "max_headers": 32,
        },
        "workers": [{"id": "w0", "url": sim.url}],
        "tenants": {"salt_secret": "limits-secret"},
        "telemetry": {"access_log": False, "log_format": "json"},
    }
    proc = serve_router(tmp, config)
    try:
        yield proc, _admin_url(tmp / "router.log")
    finally:
        proc.stop()
        sim.stop()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize(
    "headers",
    [
        b"".join(b"X-Flood-%d: v\r\n" % i for i in range(200)),
        b"X-Huge: " + b"a" * 64_000 + b"\r\n",
    ],
    ids=["200-headers", "64kB-header"],
)
def test_header_flood_is_refused_and_router_stays_up(
    limited: tuple[ServerProcess, str], headers: bytes
) -> None:
    """Too many headers or an oversized header line get a 4xx; the router keeps answering."""
    proc, _ = limited
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers + b"\r\n"
    status, _ = raw_exchange(_port(proc.url), request)
    assert 400 <= status < 500
    assert proc.alive()
    assert httpx.get(proc.url + "/health", timeout=5).status_code == 200


def test_body_over_the_limit_is_413(limited: tuple[ServerProcess, str]) -> None:
    """A body over server.max_body_bytes gets 413 with an OpenAI error."""
    proc, _ = limited
    response = httpx.post(
        proc.url + "/v1/chat/completions", json=chat_body("x" * 8000, "q"), timeout=10
    )
    assert (response.status_code, response.json()["error"]["code"]) == (413, "request_too_large")


def test_admin_api_only_on_its_own_listener(limited: tuple[ServerProcess, str]) -> None:
    """With server.admin_port set, /admin/* is 404 on the public port, served on its own port."""
    proc, admin_url = limited
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    public = httpx.get(proc.url + "/admin/workers", headers=auth, timeout=5)
    admin = httpx.get(admin_url + "/admin/workers", headers=auth, timeout=5)
    unauthorized = httpx.get(admin_url + "/admin/workers", timeout=5)
    assert public.status_code == 404
    assert public.json()["error"]["type"] == "not_found_error"
    assert admin.status_code == 200
    assert [w["id"] for w in admin.json()["workers"]] == ["w0"]
    assert unauthorized.status_code == 401
    assert _port(admin_url) != _port(proc.url)
    # Inference is not on the admin listener.
    assert httpx.post(admin_url + "/v1/chat/completions", json={}, timeout=5).status_code == 404


def test_admin_api_off_on_the_public_port_by_default(tmp_path: Path) -> None:
    """With only an admin token (no admin_port, no opt-in), the public port has no /admin/*."""
    sim = start("sim-default", sim_argv("w0"), log_path=tmp_path / "sim.log")
    try:
        proc = serve_router(
            tmp_path,
            {
                "server": {"port": 0, "admin_token": ADMIN_TOKEN},
                "workers": [{"id": "w0", "url": sim.url}],
                "telemetry": {"access_log": False},
            },
        )
        try:
            auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            answer = httpx.get(proc.url + "/admin/workers", headers=auth, timeout=5)
        finally:
            proc.stop()
    finally:
        sim.stop()
    assert answer.status_code == 404
    assert "admin API has no listener" in (tmp_path / "router.log").read_text()
