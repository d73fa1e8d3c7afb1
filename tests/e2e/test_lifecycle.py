"""The router process's lifecycle, as an operator drives it: SIGTERM drains and exits, SIGHUP
reloads the settings, DNS discovery resolves a real name. Real processes, real HTTP."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from load_tests.procs import ServerProcess, start
from tests.integration.conftest import metric_value

BIN = Path(sys.executable).parent
HEAD = "You are the lifecycle test assistant for a garden centre. " * 20


def _script(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"console script {name} is not installed in {BIN}"
    return str(path)


@pytest.fixture
def slow_sim(tmp_path: Path) -> Iterator[ServerProcess]:
    """A simulated worker that decodes one token every 50 ms (a 60-token stream: ~3 s)."""
    argv = [_script("prefix-worker"), "sim", "--port", "0", "--worker-id", "w0",
            "--decode-ms-per-token", "50", "--stream-interval-ms", "0"]  # fmt: skip
    process = start("sim", argv, log_path=tmp_path / "sim.log")
    yield process
    process.stop()


def _one_worker(url: str, grace_s: float) -> str:
    return f"workers: [{{url: '{url}'}}]\nserver: {{shutdown_grace_s: {grace_s}}}\n"


def _serve(tmp_path: Path, config: str, *extra: str) -> ServerProcess:
    path = tmp_path / "router.yaml"
    path.write_text(config)
    argv = [_script("prefix-router"), "serve", "--config", str(path), "--port", "0", *extra]
    return start("router", argv, log_path=tmp_path / "router.log")


def _body(max_tokens: int, stream: bool) -> dict[str, Any]:
    messages = [{"role": "system", "content": HEAD}, {"role": "user", "content": "hi"}]
    return {"model": "sim-model", "max_tokens": max_tokens, "stream": stream, "messages": messages}


def _log_lines(tmp_path: Path) -> list[dict[str, Any]]:
    lines = (tmp_path / "router.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


async def _stream(url: str, started: asyncio.Event) -> list[str]:
    """A 60-token stream; sets ``started`` at its first event; returns every data line."""
    events: list[str] = []
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream("POST", url + "/v1/chat/completions", json=_body(60, True)) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line)
                started.set()
    return events


async def test_sigterm_drains_open_streams_refuses_new_requests_and_exits_0(
    slow_sim: ServerProcess, tmp_path: Path
) -> None:
    """On SIGTERM, open streams run to [DONE], /ready turns 503, new requests get 503
    shutting_down, and the process exits 0 well within server.shutdown_grace_s."""
    router = _serve(tmp_path, _one_worker(slow_sim.url, 20))
    try:
        starts = [asyncio.Event() for _ in range(3)]
        streams = [asyncio.create_task(_stream(router.url, event)) for event in starts]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in starts)), timeout=20)
        signalled = time.monotonic()
        router.popen.send_signal(signal.SIGTERM)
        async with httpx.AsyncClient(timeout=10) as client:
            deadline = time.monotonic() + 10
            while (ready := await client.get(router.url + "/ready")).status_code == 200:
                assert time.monotonic() < deadline, "/ready never turned 503"
                await asyncio.sleep(0.02)
            assert ready.json()["reason"] == "shutting down"
            refused = await client.post(router.url + "/v1/chat/completions", json=_body(2, False))
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "shutting_down"
            assert refused.headers.get("connection", "").lower() == "close"
        assert not any(stream.done() for stream in streams), "streams ended before the check"
        finished = await asyncio.wait_for(asyncio.gather(*streams), timeout=20)
        for events in finished:
            assert events[-1] == "data: [DONE]"
            assert len(events) >= 61  # role chunk, 60 tokens, [DONE] (tokens may share events)
        code = await asyncio.to_thread(router.popen.wait, 20)
        assert code == 0
        assert time.monotonic() - signalled < 20
    finally:
        router.stop()
    messages = [line["msg"] for line in _log_lines(tmp_path)]
    assert "drained" in messages
    assert messages[-1] == "stopped"


async def test_streams_past_the_grace_are_cut_and_the_process_still_exits_in_time(
    slow_sim: ServerProcess, tmp_path: Path
) -> None:
    """A stream longer than shutdown_grace_s does not hold the process: it exits 0 about
    the grace after SIGTERM, and the client's stream ends early with a shutting_down error."""
    router = _serve(tmp_path, _one_worker(slow_sim.url, 0.5))
    try:
        started = asyncio.Event()
        stream = asyncio.create_task(_stream(router.url, started))
        await asyncio.wait_for(started.wait(), timeout=20)
        signalled = time.monotonic()
        router.popen.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(router.popen.wait, 10)
        took = time.monotonic() - signalled
        assert code == 0
        assert took < 0.5 + 2.0  # the grace, the cut, and process teardown
        events = await asyncio.wait_for(stream, timeout=10)
    finally:
        router.stop()
    assert len(events) < 40, "the stream was cut well before its 60 tokens"
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "shutting_down"
    assert any(line["msg"].startswith("shutdown grace over") for line in _log_lines(tmp_path))


def _wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _chat_status(url: str, key: str) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(url + "/v1/chat/completions", json=_body(2, False), headers=headers,
                      timeout=10).status_code  # fmt: skip


def test_sighup_applies_valid_settings_and_keeps_the_old_ones_when_invalid(
    slow_sim: ServerProcess, tmp_path: Path
) -> None:
    """After SIGHUP a key rotated in the secrets file works and the old one does not; a change
    that needs a restart is logged as such; an invalid file is rejected and nothing changes."""
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text("tenants: {salt_secret: s, api_keys: [{tenant: acme, key: sk-old}]}\n")
    router = _serve(tmp_path, f"workers: [{{url: '{slow_sim.url}'}}]\n", "--config", str(secrets))
    path = tmp_path / "router.yaml"
    try:
        assert _chat_status(router.url, "sk-old") == 200
        secrets.write_text("tenants: {salt_secret: s, api_keys: [{tenant: acme, key: sk-new}]}\n")
        path.write_text(
            f"workers: [{{url: '{slow_sim.url}'}}]\n"
            "routing: {load_factor: 2.0}\nindex: {capacity_blocks: 5000}\n"
        )
        router.popen.send_signal(signal.SIGHUP)
        _wait_for(lambda: _chat_status(router.url, "sk-new") == 200)
        assert _chat_status(router.url, "sk-old") == 401

        path.write_text("routing: {load_factor: 0.5}\n")  # below the minimum of 1
        router.popen.send_signal(signal.SIGHUP)

        def rejected() -> bool:
            text = httpx.get(router.url + "/metrics", timeout=10).text
            return metric_value(text, "prefix_router_reloads_total", result="rejected") == 1

        _wait_for(rejected)
        assert _chat_status(router.url, "sk-new") == 200
        metrics = httpx.get(router.url + "/metrics", timeout=10).text
        assert metric_value(metrics, "prefix_router_reloads_total", result="applied") == 1
        assert metric_value(metrics, "prefix_router_reload_restart_required") == 1
    finally:
        router.stop()
    lines = _log_lines(tmp_path)
    [applied] = [line for line in lines if line["msg"] == "settings reloaded"]
    assert "tenants.api_keys" in applied["applied"]
    assert "routing.load_factor" in applied["applied"]
    [restart] = [line for line in lines if line["msg"].startswith("settings changed that take")]
    assert restart["restart_required"] == ["index.capacity_blocks"]
    [bad] = [line for line in lines if line["msg"].startswith("settings reload rejected")]
    assert "routing.load_factor" in bad["error"]
    assert "sk-new" not in (tmp_path / "router.log").read_text()


def test_dns_discovery_resolves_a_real_name(tmp_path: Path) -> None:
    """`discovery: {kind: dns, name: localhost}` finds the worker on 127.0.0.1 by resolving
    the name through the system resolver, with no static workers at all."""
    argv = [_script("prefix-worker"), "sim", "--port", "0", "--worker-id", "w0"]
    sim = start("sim", argv, log_path=tmp_path / "sim.log")
    try:
        port = int(sim.url.rsplit(":", 1)[1])
        router = _serve(
            tmp_path,
            f"discovery: {{kind: dns, name: localhost, port: {port}, family: ipv4, "
            "interval_s: 0.2}\n",
        )
        try:
            answer = httpx.post(router.url + "/v1/chat/completions", json=_body(2, False),
                                timeout=10)  # fmt: skip
            assert answer.status_code == 200
            assert answer.headers["x-prefix-router-worker"] == f"127.0.0.1:{port}"
            metrics = httpx.get(router.url + "/metrics", timeout=10).text
            ok = metric_value(metrics, "prefix_router_discovery_resolutions_total", result="ok")
            assert ok >= 1
        finally:
            router.stop()
    finally:
        sim.stop()
