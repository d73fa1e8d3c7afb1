"""Start and stop the project's own servers as real subprocesses on loopback.

Both `prefix-router serve` and `prefix-worker sim` accept ``--port 0`` and print exactly one
line ``listening http://HOST:PORT`` on stdout once they accept connections. `start` waits for
that line (with a deadline, never a sleep) and returns the URL; `stop` terminates the process
group and reaps it. Used by the load-test harness, the demo and the integration tests.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

READY_PREFIX = "listening "


class ProcessStartError(RuntimeError):
    """A server subprocess exited or stayed silent before printing its listening line."""


@dataclass
class ServerProcess:
    """A running server subprocess and the URL it announced."""

    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log_path: Path | None = None
    argv: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would, and reap it."""
        _signal_group(self.popen, signal.SIGKILL)
        self.popen.wait(timeout=10)
        if self.popen.stdout is not None:
            self.popen.stdout.close()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit code."""
        if self.popen.poll() is None:
            _signal_group(self.popen, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.popen, signal.SIGKILL)
                self.popen.wait(timeout=10)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        return self.popen.returncode


def _signal_group(popen: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, sig)


def console_script(name: str) -> list[str]:
    """argv prefix that runs one of the project's console scripts with this interpreter."""
    modules = {"prefix-router": "router.cli", "prefix-worker": "worker.cli"}
    return [sys.executable, "-m", modules[name]]


def spawn(
    argv: Sequence[str], *, log_path: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own process group; stderr to ``log_path`` (or discarded)."""
    log_file = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    try:
        return subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=log_file if log_file is not None else subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=full_env,
        )
    finally:
        if log_file is not None:
            log_file.close()


def wait_ready(
    name: str,
    popen: subprocess.Popen[bytes],
    *,
    timeout: float = 30.0,
    log_path: Path | None = None,
    argv: Sequence[str] = (),
) -> ServerProcess:
    """Wait for the ``listening URL`` line of a spawned server (killing it on failure)."""
    assert popen.stdout is not None
    deadline = time.monotonic() + timeout
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(popen.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _signal_group(popen, signal.SIGKILL)
                popen.wait(timeout=10)
                popen.stdout.close()
                raise ProcessStartError(f"{name}: no listening line within {timeout:.0f}s")
            if not selector.select(timeout=min(remaining, 0.5)):
                if popen.poll() is not None:
                    break
                continue
            chunk = os.read(popen.stdout.fileno(), 4096)
            if not chunk:
                break
            buffer += chunk
            for line in buffer.decode(errors="replace").splitlines():
                if line.startswith(READY_PREFIX):
                    url = line[len(READY_PREFIX) :].strip()
                    return ServerProcess(name, popen, url, log_path, list(argv))
    code = popen.wait(timeout=10)
    popen.stdout.close()
    hint = f" (see {log_path})" if log_path is not None else ""
    raise ProcessStartError(f"{name}: exited with code {code} before listening{hint}")


def start(
    name: str,
    argv: Sequence[str],
    *,
    log_path: Path | None = None,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start ``argv`` in its own process group and wait for its ``listening URL`` line."""
    popen = spawn(argv, log_path=log_path, env=env)
    return wait_ready(name, popen, timeout=timeout, log_path=log_path, argv=argv)


def start_many(
    specs: Sequence[tuple[str, Sequence[str], Path | None]], *, timeout: float = 30.0
) -> list[ServerProcess]:
    """Start several servers at once (they boot in parallel); all or none are left running."""
    spawned = [(name, spawn(argv, log_path=log), log, argv) for name, argv, log in specs]
    ready: list[ServerProcess] = []
    try:
        for name, popen, log, argv in spawned:
            ready.append(wait_ready(name, popen, timeout=timeout, log_path=log, argv=argv))
    except BaseException:
        for _, popen, _, _ in spawned:
            _signal_group(popen, signal.SIGKILL)
            popen.wait(timeout=10)
            if popen.stdout is not None:
                popen.stdout.close()
        raise
    return ready
