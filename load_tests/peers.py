"""Peer routers from PyPI (``sglang-router``, ``vllm-router``) in front of simulated workers.

The load tests compare our router with the routers SGLang and vLLM publish, run as they ship
in their ``cache_aware`` and ``round_robin`` policies. This module is the harness's one entry:

- `ensure_peer` installs a peer once into its cached virtual environment (`peer_env`);
- `launch_peer` starts it on 127.0.0.1 in front of given workers and returns once it routes
  to all of them (peers print no ``listening`` line, so readiness is polled);
- `add_worker` / `remove_worker` change its workers through its admin API (worker churn);
- `fetch_assignments` tells, from the simulators' request logs, which worker served which
  ``x-request-id`` (both peers also pass the simulator's ``x-worker-id`` header through).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from load_tests import procs
from load_tests.peer_env import (
    PEERS,
    PeerSpec,
    PeerUnavailable,
    ensure_peer,
    entry_argv,
    log_tail,
    peer_dir,
    peer_info,
    peer_spec,
)

__all__ = [
    "PEERS",
    "POLICIES",
    "PeerSpec",
    "PeerUnavailable",
    "add_worker",
    "ensure_peer",
    "fetch_assignments",
    "free_port",
    "launch_peer",
    "peer_argv",
    "peer_info",
    "remove_worker",
]


# ---- running a peer ---------------------------------------------------------------------

POLICIES: tuple[str, ...] = ("cache_aware", "round_robin")
READY_TIMEOUT_S = 60.0
_POLL_S = 0.1


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (peers cannot bind port 0 and report it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def peer_argv(
    name: str,
    policy: str,
    worker_urls: Sequence[str],
    *,
    port: int,
    metrics_port: int,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The full command line that runs peer ``name`` (installed by `ensure_peer`)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    spec = peer_spec(name)
    argv = [
        *entry_argv(spec, peer_dir(name)),
        "--host", "127.0.0.1",
        "--port", str(port),
        # Both default their metrics listener to port 29000 (sglang-router on 0.0.0.0): two
        # peers at once would collide, and only loopback is allowed.
        "--prometheus-host", "127.0.0.1",
        "--prometheus-port", str(metrics_port),
        "--policy", policy,
        # Check a worker every second while registering (default 30 s): the sims are up.
        "--worker-startup-check-interval", "1",
        "--worker-startup-timeout-secs", "60",
        # Per-request INFO lines cost CPU that the load test would charge to the peer.
        "--log-level", "warn" if name == "sglang-router" else "warning",
    ]  # fmt: skip
    if worker_urls:
        argv += ["--worker-urls", *worker_urls]
    return [*argv, *extra_args]


def launch_peer(
    name: str,
    policy: str,
    worker_urls: Sequence[str],
    *,
    log_path: Path,
    port: int = 0,
    extra_args: Sequence[str] = (),
    timeout: float = READY_TIMEOUT_S,
) -> procs.ServerProcess:
    """Start peer ``name`` on 127.0.0.1 in front of ``worker_urls``; return once it routes.

    Installs the peer first if needed (`ensure_peer`). ``port=0`` picks a free port. Ready
    means: ``GET /readiness`` answers 200 and ``GET /workers`` lists every worker URL as
    healthy. stdout and stderr go to ``log_path``. On failure the process is killed and
    `PeerUnavailable` names the log. Stop the handle with ``.stop()``.
    """
    ensure_peer(name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    attempts = 1 if port else 3
    for attempt in range(1, attempts + 1):
        argv = peer_argv(
            name,
            policy,
            worker_urls,
            port=port or free_port(),
            metrics_port=free_port(),
            extra_args=extra_args,
        )
        server = _spawn(f"{name}:{policy}", argv, log_path)
        try:
            _wait_routing(server, worker_urls, timeout)
        except _ExitedEarly:
            server.kill()
            # A port picked here can be taken before the peer binds it: pick again.
            if attempt == attempts:
                raise
        except BaseException:
            server.kill()
            raise
        else:
            return server
    raise AssertionError("unreachable")


class _ExitedEarly(PeerUnavailable):
    """The peer process ended before it routed."""


def _spawn(name: str, argv: list[str], log_path: Path) -> procs.ServerProcess:
    """Start ``argv`` in its own process group, stdout and stderr appended to ``log_path``."""
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        popen = subprocess.Popen(
            argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
            env=env,
        )  # fmt: skip
    url = f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"
    return procs.ServerProcess(name, popen, url, log_path, argv)


def _norm(url: str) -> str:
    return url.rstrip("/")


def _healthy_workers(listing: Any) -> set[str]:
    """Worker URLs marked healthy in a ``GET /workers`` answer (both peers' shape)."""
    workers = listing.get("workers", []) if isinstance(listing, dict) else []
    return {
        _norm(str(w["url"]))
        for w in workers
        if isinstance(w, dict) and "url" in w and w.get("is_healthy", True)
    }


def _wait_routing(server: procs.ServerProcess, worker_urls: Sequence[str], timeout: float) -> None:
    wanted = {_norm(u) for u in worker_urls}
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while True:
            code = server.popen.poll()
            if code is not None:
                raise _ExitedEarly(
                    f"{server.name} exited with code {code} before routing "
                    f"(log: {server.log_path}):\n{log_tail(server.log_path or Path('/dev/null'))}"
                )
            try:
                ready = client.get(server.url + "/readiness")
                listing = client.get(server.url + "/workers")
                # With no workers yet a peer may call itself not ready; it still takes some.
                if listing.status_code == 200 and (ready.status_code == 200 or not wanted):
                    healthy = _healthy_workers(listing.json())
                    if wanted <= healthy:
                        return
                    last = f"healthy workers {sorted(healthy)}, waiting for {sorted(wanted)}"
                else:
                    last = f"/readiness {ready.status_code}, /workers {listing.status_code}"
            except (httpx.HTTPError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise PeerUnavailable(
                    f"{server.name} did not route within {timeout:.0f}s ({last}; "
                    f"log: {server.log_path})"
                )
            time.sleep(_POLL_S)


# ---- worker churn through the peers' admin APIs ----------------------------------------
#
# Both peers take ``POST /workers {"url": ...}`` and ``DELETE /workers/{key}`` and list their
# workers on ``GET /workers``. sglang-router queues both operations (202) and keys a worker
# by the UUID it assigned (the listing's ``id``); it no longer serves the old
# ``/add_worker`` and ``/remove_worker``. vllm-router applies them before answering (200),
# keys a worker by its URL (its listing has no ``id``), and also serves ``POST
# /add_worker?url=`` and ``POST /remove_worker?url=``. The functions below return once the
# listing shows the change, so a scenario knows when the peer routes to the new set.

ADMIN_TIMEOUT_S = 30.0


async def _listing(client: httpx.AsyncClient, peer_url: str) -> list[dict[str, Any]]:
    response = await client.get(f"{_norm(peer_url)}/workers")
    response.raise_for_status()
    body = response.json()
    workers = body.get("workers", []) if isinstance(body, dict) else []
    return [w for w in workers if isinstance(w, dict) and "url" in w]


async def _await_listing(
    client: httpx.AsyncClient,
    peer_url: str,
    done: Callable[[list[dict[str, Any]]], bool],
    what: str,
    within: float,
) -> None:
    deadline = time.monotonic() + within
    while True:
        if done(await _listing(client, peer_url)):
            return
        if time.monotonic() >= deadline:
            raise PeerUnavailable(f"{peer_url}: {what} not visible within {within:.0f}s")
        await asyncio.sleep(_POLL_S)


def _admin_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=10.0, trust_env=False)


async def add_worker(peer_url: str, worker_url: str, *, within: float = ADMIN_TIMEOUT_S) -> None:
    """Register ``worker_url`` with a running peer; return once it is listed as healthy."""
    wanted = _norm(worker_url)
    async with _admin_client() as client:
        response = await client.post(f"{_norm(peer_url)}/workers", json={"url": worker_url})
        if response.status_code not in (200, 201, 202):
            raise PeerUnavailable(
                f"{peer_url}: adding {worker_url} failed: {response.status_code} {response.text}"
            )
        await _await_listing(
            client,
            peer_url,
            lambda ws: wanted in _healthy_workers({"workers": ws}),
            f"worker {worker_url}",
            within,
        )


async def remove_worker(peer_url: str, worker_url: str, *, within: float = ADMIN_TIMEOUT_S) -> None:
    """Deregister ``worker_url`` from a running peer; return once it is no longer listed."""
    wanted = _norm(worker_url)
    async with _admin_client() as client:
        entries = [w for w in await _listing(client, peer_url) if _norm(str(w["url"])) == wanted]
        if not entries:
            raise PeerUnavailable(f"{peer_url}: {worker_url} is not one of its workers")
        key = str(entries[0].get("id") or urllib.parse.quote(str(entries[0]["url"]), safe=""))
        response = await client.delete(f"{_norm(peer_url)}/workers/{key}")
        if response.status_code not in (200, 202, 204):
            raise PeerUnavailable(
                f"{peer_url}: removing {worker_url} failed: {response.status_code} "
                f"{response.text}"
            )
        await _await_listing(
            client,
            peer_url,
            lambda ws: all(_norm(str(w["url"])) != wanted for w in ws),
            f"removal of {worker_url}",
            within,
        )


# ---- which worker served a request ------------------------------------------------------
#
# Both peers pass the simulator's ``x-worker-id`` response header through, streamed or not,
# so a client reads the worker from the response as it does behind our router. For a check
# after the fact, both also forward the client's ``x-request-id`` header to the worker, whose
# request log keeps it: send a unique ``x-request-id`` per request and call
# `fetch_assignments` while the requests are still in the workers' logs (the newest 1,024
# per worker).

REQUEST_LOG_LIMIT = 1024


async def fetch_assignments(
    worker_urls: Sequence[str], *, client: httpx.AsyncClient | None = None
) -> dict[str, str]:
    """``x-request-id -> worker_id`` for every logged request the simulators received.

    A request a peer retried on a second worker maps to the worker that logged it last.
    """
    own = client is None
    http = client or _admin_client()
    try:
        found: list[tuple[float, str, str]] = []
        for url in worker_urls:
            base = _norm(url)
            state = (await http.get(f"{base}/sim/state")).raise_for_status().json()
            log = await http.get(f"{base}/sim/requests", params={"limit": REQUEST_LOG_LIMIT})
            for record in log.raise_for_status().json()["requests"]:
                request_id = record["headers"].get("x-request-id")
                if request_id:
                    found.append((record["received_at"], request_id, state["worker_id"]))
        return {request_id: worker for _, request_id, worker in sorted(found)}
    finally:
        if own:
            await http.aclose()
