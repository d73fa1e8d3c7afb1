"""``prefix-router serve --processes N``: N full router processes sharing one port.

One Python process tops out at one core. With ``--processes N`` the command becomes a small
supervisor that starts N ordinary ``serve`` processes bound to the same address with
``SO_REUSEPORT``, so the kernel spreads incoming connections over them, each on its own core.

- The port: the supervisor binds it first (with ``SO_REUSEPORT``, never listening on it), so
  ``--port 0`` resolves to one real port that every child then binds too; the supervisor lets
  go of its socket once every child listens. It prints ``listening http://HOST:PORT`` once,
  when all N accept connections.
- Signals: SIGTERM and SIGINT are forwarded to every child as SIGTERM (each drains its own
  in-flight requests, as a single process does; a second signal cuts the drains short);
  SIGHUP is forwarded as is (each child rereads the settings). The supervisor exits when the
  last child has, with 0 when all of them stopped cleanly on request.
- A child that dies on its own is not restarted: the supervisor stops the others (gracefully)
  and exits 1, so the orchestrator (Kubernetes, systemd) restarts the whole pod/unit and the
  failure is visible, rather than a process quietly flapping.
- Children run in their own session (a terminal's Ctrl-C reaches them once, through the
  supervisor) and get SIGTERM from the kernel if the supervisor dies (``PR_SET_PDEATHSIG``).

State is per process: each child has its own warm index, load counts, metrics and admin API
unless ``index.kind``/``loads.kind`` are ``redis`` (then they share warm prefixes and loads
as separate replicas do). Use Redis with ``--processes`` > 1 in production.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

log = logging.getLogger("prefix_router.supervisor")

READY_PREFIX = "listening "
START_TIMEOUT_S = 60.0
_PR_SET_PDEATHSIG = 1


class SupervisorError(RuntimeError):
    """The shared port could not be bound, or a child did not start."""


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) ``SO_REUSEPORT`` socket holding ``host:port`` (0: a free one)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise SupervisorError(f"cannot bind {host}:{port}: {exc}") from exc
    return sock


def _die_with_parent(parent: int) -> None:
    """Runs in the child before exec: SIGTERM when the supervisor goes away, even by SIGKILL."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


class Supervisor:
    """Starts the children, forwards signals to them, and waits for them to finish."""

    def __init__(self, child_argv: Sequence[str], processes: int) -> None:
        self._argv = list(child_argv)
        self._count = processes
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._stopping = False
        self._failed = False

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._send(signal.SIGHUP)
            return
        self._stopping = True
        self._send(signal.SIGTERM)

    def _send(self, sig: int) -> None:
        for child in self._children.values():
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(sig)

    def run(self, host: str, port: int) -> int:
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous = {sig: signal.signal(sig, self._forward) for sig in handled}
        try:
            with reserve_port(host, port) as reserved:
                bound_port = reserved.getsockname()[1]
                url = self._start_all(bound_port)
            if url is not None:
                print(f"{READY_PREFIX}{url}", flush=True)
                log.info(
                    "router processes started",
                    extra={"fields": {"url": url, "processes": self._count,
                                      "pids": sorted(self._children)}},
                )  # fmt: skip
            return self._wait_all()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _start_all(self, port: int) -> str | None:
        """Spawn every child and wait for its listening line; None when stopped meanwhile."""
        argv = [*self._argv, "--port", str(port)]
        parent = os.getpid()
        for _ in range(self._count):
            child = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=lambda: _die_with_parent(parent),
            )  # fmt: skip
            self._children[child.pid] = child
        url: str | None = None
        for child in list(self._children.values()):
            announced = self._await_listening(child)
            if announced is None:
                return None
            url = url or announced
        return url

    def _await_listening(self, child: subprocess.Popen[bytes]) -> str | None:
        assert child.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(child.stdout, selectors.EVENT_READ)
            while not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SupervisorError(f"process {child.pid} did not listen in time")
                if not selector.select(timeout=min(remaining, 0.2)):
                    continue
                chunk = os.read(child.stdout.fileno(), 4096)
                if not chunk:
                    code = child.wait()
                    raise SupervisorError(f"process {child.pid} exited with {code} at start")
                buffer += chunk
                for line in buffer.decode(errors="replace").splitlines():
                    if line.startswith(READY_PREFIX):
                        return line[len(READY_PREFIX) :].strip()
        return None

    def _wait_all(self) -> int:
        while any(child.returncode is None for child in self._children.values()):
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            child = self._children.get(pid)
            if child is None:
                continue
            child.returncode = os.waitstatus_to_exitcode(status)
            if not self._stopping:
                log.error(
                    "router process exited on its own; stopping the others",
                    extra={"fields": {"pid": pid, "code": child.returncode}},
                )
                self._failed = True
                self._stopping = True
                self._send(signal.SIGTERM)
            elif child.returncode != 0:
                self._failed = True
        return 1 if self._failed else 0

    def _stop_all(self) -> None:
        """Whatever happened, no child outlives the supervisor."""
        self._send(signal.SIGTERM)
        for child in self._children.values():
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            if child.stdout is not None:
                child.stdout.close()


def supervise(argv: Sequence[str], host: str, port: int, processes: int) -> int:
    """Run ``processes`` copies of ``prefix-router <argv>`` sharing ``host:port``."""
    child_argv = [sys.executable, "-m", "router.cli", *argv, "--processes", "1", "--reuse-port"]
    try:
        return Supervisor(child_argv, processes).run(host, port)
    except SupervisorError as exc:
        print(f"prefix-router: {exc}", file=sys.stderr)
        return 1
