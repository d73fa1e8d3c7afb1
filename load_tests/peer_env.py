"""Install the peer routers (``sglang-router``, ``vllm-router``) into cached virtualenvs.

The load tests compare our router with the routers SGLang and vLLM publish (`peers` runs
them). Each peer is installed once, at a pinned version, into its own virtual environment
outside the repository, ``$PREFIX_ROUTER_CACHE/peers/<name>-<version>/`` (default
``~/.cache/prefix-router``), so its dependencies never mix with ours:

1. ``python -m venv`` with the interpreter that made ours (``sys._base_executable``);
2. ``pip install <package>==<version>`` (both are self-contained Rust wheels whose Python
   dependencies are small: fastapi, uvicorn, aiohttp, orjson...; no torch);
3. ``<entry> --help`` must exit 0 (the wheel's native module loads on this machine);
4. a stamp file records the version, build time and size. It is written last, atomically:
   it is the only sign of a finished install. A directory without a matching stamp is a
   half-finished build and is deleted before building again. A lock file next to the
   directory serialises concurrent builders (the pattern of tests/vllm/env.py).

A failed step raises `PeerUnavailable` naming the step and pip's log; ``network`` is true
when pip's log shows a connection failure or, after pip failed, the index (``PIP_INDEX_URL``,
else PyPI) does not answer for the package: tests skip on that alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console

STAMP = ".prefix-router-peer.json"
RECIPE = 1
"""Bump when the install steps change, so existing environments are rebuilt."""

DEFAULT_INDEX = "https://pypi.org/simple"
INSTALL_TIMEOUT_S = 900.0
CHECK_TIMEOUT_S = 120.0

_NETWORK_SIGNS = (
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "NewConnectionError",
    "ConnectTimeoutError",
    "ProxyError",
    "Network is unreachable",
    "Connection refused",
    "Read timed out",
    "Could not fetch URL",
)
"""Phrases pip logs when the package index cannot be reached."""


class PeerUnavailable(RuntimeError):
    """A peer router could not be installed, started or reconfigured; the message says where."""

    def __init__(self, message: str, *, network: bool = False, log: Path | None = None) -> None:
        super().__init__(message)
        self.network = network
        """True when the install failed because the package index was unreachable."""
        self.log = log


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """One peer router: what to install and how to run it."""

    name: str
    package: str
    version: str
    entry: tuple[str, ...]
    """Run with the venv's interpreter: ``("-m", module)``, or a console script's name."""
    module: bool

    def dirname(self) -> str:
        return f"{self.name}-{self.version}"


PEERS: dict[str, PeerSpec] = {
    "sglang-router": PeerSpec(
        name="sglang-router",
        package="sglang-router",
        version="0.3.2",
        entry=("-m", "sglang_router.launch_router"),
        module=True,
    ),
    "vllm-router": PeerSpec(
        name="vllm-router",
        package="vllm-router",
        version="0.1.17",
        entry=("vllm-router",),
        module=False,
    ),
}


def cache_root() -> Path:
    """``$PREFIX_ROUTER_CACHE`` or ``~/.cache/prefix-router``."""
    configured = os.environ.get("PREFIX_ROUTER_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache/prefix-router"


def peer_dir(name: str) -> Path:
    """Where the peer's virtual environment lives (whether or not it is built)."""
    return cache_root() / "peers" / peer_spec(name).dirname()


def peer_spec(name: str) -> PeerSpec:
    """The spec of peer ``name``; `ValueError` for an unknown name."""
    try:
        return PEERS[name]
    except KeyError:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(sorted(PEERS))}") from None


def entry_argv(spec: PeerSpec, directory: Path) -> list[str]:
    """The argv prefix that runs ``spec`` from its environment at ``directory``."""
    if spec.module:
        return [str(directory / "bin" / "python"), *spec.entry]
    return [str(directory / "bin" / spec.entry[0]), *spec.entry[1:]]


def _read_stamp(directory: Path, spec: PeerSpec) -> dict[str, object] | None:
    try:
        data = json.loads((directory / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if data.get("package") != spec.package or data.get("version") != spec.version:
        return None
    if data.get("recipe") != RECIPE:
        return None
    return data


def peer_info(name: str) -> dict[str, object] | None:
    """The stamp of an installed peer (version, build seconds, size), or None."""
    spec = peer_spec(name)
    return _read_stamp(peer_dir(name), spec)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for a ``with`` block:
    two processes building the same cached environment wait for each other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def dir_size(path: Path) -> int:
    """Bytes of every file under ``path`` (symlinks not followed)."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for filename in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, filename)).st_size
    return total


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` of a log file (for error messages)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _network_failure(log: Path) -> bool:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return False
    return any(sign in text for sign in _NETWORK_SIGNS)


def _index_reachable(package: str) -> bool:
    """Whether the package index answers at all (pip says only "no matching distribution")."""
    index = os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX
    try:
        httpx.get(f"{index.rstrip('/')}/{package}/", timeout=10.0)
    except httpx.TransportError:
        return False
    return True


def _run_step(
    argv: list[str], log: Path, timeout: float, what: str, *, package: str | None = None
) -> None:
    """Run one install step with its output appended to ``log``; `PeerUnavailable` on failure.

    With ``package`` (a pip step), a failure counts as a network failure when pip's log says
    so or when the index does not answer for that package.
    """
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        env = dict(os.environ)
        # The peer's own pip and interpreter must not see our venv's settings.
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        try:
            done = subprocess.run(
                argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, timeout=timeout,
                env=env, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise PeerUnavailable(
                f"{what}: timed out after {timeout:.0f}s (log: {log})",
                network=_network_failure(log),
                log=log,
            ) from None
    if done.returncode != 0:
        network = _network_failure(log) or (package is not None and not _index_reachable(package))
        raise PeerUnavailable(
            f"{what} failed with exit code {done.returncode} (log: {log}):\n{log_tail(log)}",
            network=network,
            log=log,
        )


def _base_python() -> str:
    # sys._base_executable is the interpreter our .venv was made from: the peer's venv must
    # not depend on ours.
    return str(getattr(sys, "_base_executable", None) or sys.executable)


def ensure_peer(name: str, *, console: Console | None = None) -> list[str]:
    """Install the peer in its cached venv if needed; return the argv prefix that runs it.

    Raises `PeerUnavailable` (with ``network`` set when the index was unreachable) and
    `ValueError` for an unknown name.
    """
    spec = peer_spec(name)
    directory = peer_dir(name)
    if _read_stamp(directory, spec) is not None:
        return entry_argv(spec, directory)

    def say(message: str) -> None:
        if console is not None:
            console.print(f"  {name}: {message}", highlight=False, markup=False)

    with locked(directory.with_name(directory.name + ".lock")):
        if _read_stamp(directory, spec) is not None:
            return entry_argv(spec, directory)  # another process finished while we waited
        if directory.exists():
            say(f"removing incomplete environment {directory}")
            shutil.rmtree(directory)
        log = directory.with_name(directory.name + ".log")
        log.write_bytes(b"")
        started = time.monotonic()
        python = str(directory / "bin" / "python")
        say(f"installing {spec.package}=={spec.version} into {directory} (log: {log})")
        _run_step([_base_python(), "-m", "venv", str(directory)], log, 120, "python -m venv")
        requirement = f"{spec.package}=={spec.version}"
        _run_step(
            [python, "-m", "pip", "install", "--no-input", requirement],
            log, INSTALL_TIMEOUT_S, f"pip install {requirement}", package=spec.package,
        )  # fmt: skip
        argv = entry_argv(spec, directory)
        _run_step([*argv, "--help"], log, CHECK_TIMEOUT_S, f"{name} --help")
        info: dict[str, object] = {
            "package": spec.package,
            "version": spec.version,
            "recipe": RECIPE,
            "build_seconds": round(time.monotonic() - started, 1),
            "size_bytes": dir_size(directory),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        tmp = directory / (STAMP + ".tmp")
        tmp.write_text(json.dumps(info, indent=2), encoding="utf-8")
        tmp.replace(directory / STAMP)
        say(f"ready in {info['build_seconds']}s, {dir_size(directory) >> 20} MiB")
        return argv
