"""One simulated worker and one router, real subprocesses on loopback, shared by a fuzz module.

The router runs as ``prefix-router serve`` so a crash would show as a dead process, and its log
(stderr) is kept to look for unhandled errors afterwards. ``FUZZ_EXAMPLES`` (``make fuzz``)
raises every fuzzer's example count; the default keeps ``make test`` fast.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from load_tests.procs import ServerProcess, console_script, start
from tests.integration.conftest import sim_argv

API_KEY = "sk-fuzz-tenant"
ADMIN_TOKEN = "fuzz-admin-token"
SALT_SECRET = "fuzz-salt-secret"


def examples(default: int) -> int:
    """The example count for one fuzzer: ``default``, or ``FUZZ_EXAMPLES`` when set."""
    return int(os.environ.get("FUZZ_EXAMPLES", default))


@dataclass
class Target:
    url: str
    port: int
    log_path: Path
    router: ServerProcess

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("fuzz")
    sim = start("sim-fuzz", sim_argv("w0"), log_path=tmp / "sim.log")
    config = {
        "server": {
            "port": 0,
            "admin_token": ADMIN_TOKEN,
            "admin_on_public_port": True,
            "max_body_bytes": 256 * 1024,
        },
        "workers": [{"id": "w0", "url": sim.url}],
        "tenants": {
            "api_keys": [{"tenant": "fuzz", "key": API_KEY}],
            "salt_secret": SALT_SECRET,
        },
        "health": {"probe_interval_s": 0.5},
        "telemetry": {"access_log": False},
    }
    path = tmp / "router.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp / "router.log"
    router = start(
        "router-fuzz",
        [*console_script("prefix-router"), "serve", "--config", str(path)],
        log_path=log_path,
    )
    try:
        port = int(router.url.rsplit(":", 1)[1])
        yield Target(router.url, port, log_path, router)
    finally:
        router.stop()
        sim.stop()


def raw_exchange(port: int, request: bytes, *, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send raw bytes, read until the server closes; (status, body). A hang fails the test."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"no answer within {timeout}s (stuck connection)") from None
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    data = b"".join(chunks)
    # aiohttp answers a request it could not parse as HTTP/1.0.
    assert data.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), f"no HTTP answer: {data[:80]!r}"
    status = int(data[9:12])
    _, _, body = data.partition(b"\r\n\r\n")
    return status, body
