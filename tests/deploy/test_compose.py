"""The compose files pass Docker Compose's validation (the docker compose plugin when
installed, else the offline model in compose_model.py; no daemon either way) and hold together:
the routers' settings load with the environment compose gives them, they name workers and a
Redis that exist in the file, no host port is published twice, stop grace outlasts the
router's drain, and on the GPU host each sidecar shares its worker's network and agrees with it
and with the router."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from router.config import Settings, load_settings
from tests.deploy.compose_checks import semantic_errors
from tests.deploy.tools import REPO, compose_command
from worker.cli import build_parser

DEPLOY = REPO / "deploy"
COMPOSE_FILES = ["compose.yaml", "compose.gpu.yaml"]
IMAGES = {
    "prefix-router/router": "deploy/router.Dockerfile",
    "prefix-router/sim": "deploy/sim.Dockerfile",
    "prefix-router/worker-vllm": "deploy/worker-vllm.Dockerfile",
}


def _compose(*args: str, files: list[Path]) -> subprocess.CompletedProcess[str]:
    # Only PATH and HOME: variables of the developer's shell must not change the result. The
    # offline model runs as `python -m tests.deploy.compose_model`, hence cwd=REPO.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    argv = [*compose_command()]
    for path in files:
        argv += ["-f", str(path)]
    return subprocess.run(
        [*argv, "--profile", "*", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def composed() -> dict[str, dict[str, Any]]:
    """Compose file name -> the model `docker compose config` resolves (interpolated), from
    the plugin or the offline model (same shape)."""
    models = {}
    for name in COMPOSE_FILES:
        result = _compose("config", "--format", "json", files=[DEPLOY / name])
        assert result.returncode == 0, f"{name}: {result.stderr}"
        models[name] = json.loads(result.stdout)
    return models


def _duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    raise AssertionError(f"not a duration: {text}")


def _router_services(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in model["services"].items()
        if service["image"].startswith("prefix-router/router:")
    }


def _settings(service: dict[str, Any]) -> Settings:
    command = service["command"]
    target = command[command.index("--config") + 1]
    sources = [v["source"] for v in service["volumes"] if v["target"] == target]
    assert len(sources) == 1, f"nothing mounted at {target}"
    return load_settings(Path(sources[0]), env=service.get("environment") or {})


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_validates(name: str) -> None:
    """`docker compose config --quiet` (or its offline model) accepts the file, every profile
    included."""
    result = _compose("config", "--quiet", files=[DEPLOY / name])
    assert result.returncode == 0, result.stderr


def test_compose_validation_rejects_an_unknown_key(tmp_path: Path) -> None:
    """The compose check is real: a misspelt service key fails it."""
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  a:\n    image: redis:7.4.2-alpine\n    restrat: always\n")
    result = _compose("config", "--quiet", files=[bad])
    assert result.returncode != 0
    assert "restrat" in result.stderr


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_references_resolve_and_no_host_port_is_published_twice(
    composed: dict[str, dict[str, Any]], name: str
) -> None:
    """Every dependency, network, volume, config and secret a service names exists, and no two
    services publish one host port (Compose itself only finds that when containers start)."""
    assert semantic_errors(composed[name]) == []


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_images_are_pinned_and_built_from_deploy(
    composed: dict[str, dict[str, Any]], name: str
) -> None:
    """Third-party images carry a version tag; ours are built from the deploy/ Dockerfiles."""
    for service_name, service in composed[name]["services"].items():
        image, _, tag = service["image"].rpartition(":")
        assert image, service_name
        assert tag not in ("", "latest"), f"{service_name}: {service['image']}"
        if image in IMAGES and "build" in service:
            assert service["build"]["dockerfile"] == IMAGES[image]
            assert Path(service["build"]["context"]) == REPO


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_router_settings_load_and_name_real_services(
    composed: dict[str, dict[str, Any]], name: str
) -> None:
    """Each router's settings load with its compose environment, share Redis, name workers
    that are services of the file, and its stop grace outlasts the drain."""
    model = composed[name]
    routers = _router_services(model)
    assert routers
    for service_name, service in routers.items():
        settings = _settings(service)
        assert settings.index.kind == settings.loads.kind == "redis"
        assert settings.redis.url is not None
        assert urlsplit(settings.redis.url.get_secret_value()).hostname in model["services"]
        hosts = {urlsplit(worker.url).hostname for worker in settings.workers}
        assert hosts, service_name
        assert hosts <= set(model["services"]), service_name
        grace = _duration_s(service["stop_grace_period"])
        assert grace > settings.server.shutdown_grace_s
        assert service.get("read_only"), service_name
        assert service.get("cap_drop") == ["ALL"], service_name
    salts = {_settings(s).tenants.salt_secret for s in routers.values()}
    assert len(salts) == 1, "replicas must share the salt secret"


def test_one_machine_runs_two_routers_over_simulators(
    composed: dict[str, dict[str, Any]],
) -> None:
    """compose.yaml has two router replicas in front of simulated workers on their port."""
    model = composed["compose.yaml"]
    routers = _router_services(model)
    assert len(routers) == 2
    settings = _settings(next(iter(routers.values())))
    for worker in settings.workers:
        sim = model["services"][urlsplit(worker.url).hostname or ""]
        args = build_parser().parse_args(["sim", *sim["command"]])
        assert (args.host, args.port) == ("0.0.0.0", urlsplit(worker.url).port)


def test_gpu_workers_sidecars_and_router_agree(composed: dict[str, dict[str, Any]]) -> None:
    """On the GPU host every vLLM worker reserves its own GPU, its sidecar shares its network
    and uses its worker id, topic and endpoints, and the router's exact settings match."""
    model = composed["compose.gpu.yaml"]
    router = _settings(_router_services(model)["router"])
    workers = {urlsplit(w.url).hostname: w for w in router.workers}
    sidecars = {
        s["network_mode"].removeprefix("service:"): s
        for s in model["services"].values()
        if s.get("network_mode", "").startswith("service:")
    }
    assert set(sidecars) == set(workers)
    gpus: list[str] = []
    for host, spec in workers.items():
        service = model["services"][host]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia"
        assert "gpu" in devices[0]["capabilities"]
        gpus += devices[0]["device_ids"]
        launcher = build_parser().parse_args(service["command"])
        sidecar = build_parser().parse_args(sidecars[host]["command"])
        assert launcher.worker_id == sidecar.worker_id == spec.worker_id
        assert sidecar.topic == (launcher.kv_events_topic or f"kv-events/{launcher.worker_id}")
        assert sidecar.endpoint == launcher.kv_events_endpoint
        assert sidecar.replay_endpoint == launcher.kv_events_replay_endpoint
        assert (router.exact.block_size, router.exact.hash_algo, router.exact.hash_seed) == (
            launcher.block_size,
            launcher.hash_algo,
            launcher.hash_seed,
        )
        assert str(router.exact.model_dir) == launcher.model
        assert sidecar.prefix == router.redis.prefix
        assert router.redis.url is not None
        assert (
            urlsplit(sidecar.redis_url).hostname
            == urlsplit(router.redis.url.get_secret_value()).hostname
        )
    assert len(gpus) == len(set(gpus)), "two workers share a GPU"
