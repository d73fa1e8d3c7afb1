"""The README's command lines, run as a new user runs them: real processes, real HTTP."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from load_tests.procs import ServerProcess, start

BIN = Path(sys.executable).parent
HEAD = "You are the support assistant for a hardware store. " * 30


def _script(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"console script {name} is not installed in {BIN}"
    return str(path)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[ServerProcess]:
    argv = [_script("prefix-worker"), "sim", "--port", "0", "--worker-id", "w0",
            "--cache-blocks", "512", "--block-size", "16"]  # fmt: skip
    process = start("sim", argv, log_path=tmp_path / "sim.log")
    yield process
    process.stop()


def _chat(url: str, key: str | None = None) -> httpx.Response:
    body = {"model": "sim-model", "messages": [{"role": "system", "content": HEAD},
            {"role": "user", "content": "hi"}], "max_tokens": 2}  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=10)


def test_serve_with_worker_flags(sim: ServerProcess, tmp_path: Path) -> None:
    """`prefix-router serve --worker URL --port 0` routes, and exits 0 on SIGTERM."""
    argv = [_script("prefix-router"), "serve", "--worker", sim.url, "--port", "0"]
    router = start("router", argv, log_path=tmp_path / "router.log")
    try:
        first, second = _chat(router.url), _chat(router.url)
        assert first.status_code == 200
        assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert second.headers["x-prefix-router-worker"] == "127.0.0.1:" + sim.url.rsplit(":")[-1]
        router.popen.send_signal(signal.SIGTERM)
        assert router.popen.wait(timeout=15) == 0
    finally:
        router.stop()
    log = (tmp_path / "router.log").read_text()
    assert '"msg":"router started"' in log
    assert '"msg":"stopped"' in log


def test_serve_with_config_file(sim: ServerProcess, tmp_path: Path) -> None:
    """`prefix-router serve --config FILE` takes workers, keys and policy from the file."""
    config = tmp_path / "router.yaml"
    config.write_text(
        "workers:\n"
        f"  - {{id: only, url: '{sim.url}'}}\n"
        "routing: {policy: consistent_hash}\n"
        "tenants:\n"
        "  salt_secret: from-the-file\n"
        "  api_keys:\n"
        "    - {key: sk-file, tenant: filed}\n"
    )
    argv = [_script("prefix-router"), "serve", "--config", str(config), "--port", "0"]
    router = start("router", argv, log_path=tmp_path / "router.log")
    try:
        assert _chat(router.url).status_code == 401
        ok = _chat(router.url, key="sk-file")
        assert ok.status_code == 200
        assert ok.headers["x-prefix-router-worker"] == "only"
        assert "policy=consistent_hash" in ok.headers["x-prefix-router-decision"]
    finally:
        router.stop()


def test_check_prints_settings_without_secrets(tmp_path: Path) -> None:
    """`serve --check` validates and prints the settings, with secrets masked."""
    config = tmp_path / "router.yaml"
    config.write_text(
        "tenants: {salt_secret: do-not-print-me}\nworkers: [{url: 'http://w:8000'}]\n"
    )
    done = subprocess.run(
        [_script("prefix-router"), "serve", "--config", str(config), "--check"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "do-not-print-me" not in done.stdout
    assert '"policy": "cache_aware"' in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve"], "no workers configured"),
        (["serve", "--worker", "ftp://x"], "worker url must be http"),
        (["serve", "--config", "/nonexistent.yaml"], "cannot read config"),
    ],
)
def test_bad_invocations_exit_2_with_a_reason(args: list[str], message: str) -> None:
    """Missing workers, a bad URL or an unreadable file exit 2 with a one-line reason."""
    done = subprocess.run(
        [_script("prefix-router"), *args], capture_output=True, text=True, timeout=30,
        check=False, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 2
    assert message in done.stderr
