"""Fixtures of the deployment tests: each kustomize overlay rendered once per session."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import K8S, OVERLAYS, Obj, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[Obj]]:
    """Overlay name -> the objects `kubectl kustomize k8s/overlays/<name>` renders."""
    return {overlay: render(K8S / "overlays" / overlay) for overlay in OVERLAYS}
