"""Reading rendered Kubernetes manifests: find objects, walk pod templates, resolve a
container's environment as the kubelet would, and load the router's settings from them.

Nothing here is a fixture; `conftest.py` renders each overlay once per session and the tests
use these helpers on the result.
"""

from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from router.config import Settings, load_settings
from tests.deploy.tools import REPO, kustomize_command

K8S = REPO / "k8s"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if path.is_dir())
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")

Obj = dict[str, Any]

# Secrets an overlay expects the operator to create (docs/operations.md), with stand-in values
# for loading the settings. Optional references (optional: true) need no entry.
EXTERNAL_SECRETS: dict[str, dict[str, dict[str, str]]] = {
    "gpu": {
        "prefix-router-secrets": {
            "salt-secret": "test-salt",
            "admin-token": "test-admin",
            "redis-password": "test-redis",
            "api-keys": '[{tenant: t, key_sha256: "' + "ab" * 32 + '"}]',
        }
    }
}


def render(directory: Path) -> list[Obj]:
    """The objects `kubectl kustomize` (or `kustomize build`) renders for a directory."""
    result = subprocess.run(
        [*kustomize_command(), str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"rendering {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [
        obj
        for obj in objects
        if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
    ]


def one(objects: list[Obj], kind: str, name: str) -> Obj:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_templates(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(workload, pod template) for every object that runs pods."""
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS:
            yield obj, obj["spec"]["template"]


def containers(pod_spec: Obj) -> list[Obj]:
    """Every container of a pod spec, init containers (and native sidecars) included."""
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def container(pod_spec: Obj, name: str) -> Obj:
    matches = [c for c in containers(pod_spec) if c["name"] == name]
    assert len(matches) == 1, f"no container {name!r}"
    return matches[0]


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def secret_value(objects: list[Obj], overlay: str, name: str, key: str) -> str | None:
    """A Secret's value from the render, or the stand-in for a Secret the operator creates."""
    for secret in find(objects, "Secret", name):
        if key in secret.get("stringData", {}):
            return str(secret["stringData"][key])
        if key in secret.get("data", {}):
            return base64.b64decode(secret["data"][key]).decode()
        return None
    return EXTERNAL_SECRETS.get(overlay, {}).get(name, {}).get(key)


_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined variables are replaced, others left as is."""
    return _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def container_env(objects: list[Obj], overlay: str, spec: Obj) -> dict[str, str]:
    """A container's environment as the kubelet builds it (fieldRefs get stand-in values)."""
    env: dict[str, str] = {}
    for item in spec.get("env", []):
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item["value"]), env)
            continue
        source = item["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            value = secret_value(objects, overlay, ref["name"], ref["key"])
            if value is None:
                assert ref.get("optional"), f"{name}: Secret {ref['name']}/{ref['key']} is missing"
                continue
            env[name] = value
        elif "fieldRef" in source:
            env[name] = {"status.podIP": "10.0.0.7"}.get(
                source["fieldRef"]["fieldPath"], "stand-in"
            )
        else:
            raise AssertionError(f"{name}: unexpected env source {source}")
    return env


def config_map_file(objects: list[Obj], pod_spec: Obj, mount_path: str, filename: str) -> str:
    """The text of ``filename`` in the ConfigMap a container mounts at ``mount_path``."""
    volumes = {volume["name"]: volume for volume in pod_spec.get("volumes", [])}
    for spec in containers(pod_spec):
        for mount in spec.get("volumeMounts", []):
            if mount["mountPath"] == mount_path and "configMap" in volumes[mount["name"]]:
                config_map = one(objects, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
                return str(config_map["data"][filename])
    raise AssertionError(f"nothing mounts a ConfigMap at {mount_path}")


def router_settings(objects: list[Obj], overlay: str, tmp_path: Path) -> Settings:
    """The settings a router pod of this render starts with: its config file, then its env."""
    deployment = one(objects, "Deployment", "prefix-router")
    pod = deployment["spec"]["template"]["spec"]
    router = container(pod, "router")
    args = router["args"]
    config_path = Path(args[args.index("--config") + 1])
    text = config_map_file(objects, pod, str(config_path.parent), config_path.name)
    local = tmp_path / f"{overlay}-{config_path.name}"
    local.write_text(text)
    return load_settings(local, env=container_env(objects, overlay, router))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())
