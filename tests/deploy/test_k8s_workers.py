"""The worker pods of each overlay agree with the router: their command lines parse with the
real `prefix-worker` parser, and in precise mode the launcher, the KV-event sidecar and the
router's exact-hashing settings name the same worker id, topic, endpoints, block size, hash
algorithm, seed, model and Redis."""

from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import urlsplit

from tests.deploy.manifests import (
    Obj,
    container,
    container_env,
    expand,
    one,
    router_settings,
)
from worker.cli import build_parser


def _parse(objects: list[Obj], overlay: str, spec: Obj) -> argparse.Namespace:
    """A container's command line, with $(VAR) expanded, parsed by `prefix-worker`'s parser."""
    env = container_env(objects, overlay, spec)
    argv = [expand(part, env) for part in [*spec.get("command", []), *spec.get("args", [])]]
    assert argv[0] == "prefix-worker", argv
    return build_parser().parse_args(argv[1:])


def test_dev_workers_are_simulators_on_the_discovered_port(
    rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    """The dev overlay's workers run `prefix-worker sim` on all interfaces, on the port the
    router's discovery dials."""
    objects = rendered["dev"]
    pod = one(objects, "StatefulSet", "prefix-workers")["spec"]["template"]["spec"]
    sim = container(pod, "sim")
    args = build_parser().parse_args(["sim", *sim["args"]])
    discovery = router_settings(objects, "dev", tmp_path).discovery
    assert (args.host, args.port) == ("0.0.0.0", discovery.port)


def test_gpu_workers_request_gpus_and_run_the_sidecar(rendered: dict[str, list[Obj]]) -> None:
    """Each vLLM pod asks for a GPU and runs the kv-events sidecar as a native sidecar."""
    pod = one(rendered["gpu"], "StatefulSet", "prefix-workers")["spec"]["template"]["spec"]
    vllm = container(pod, "vllm")
    assert vllm["resources"]["requests"]["nvidia.com/gpu"] >= 1
    assert (
        vllm["resources"]["limits"]["nvidia.com/gpu"]
        == vllm["resources"]["requests"]["nvidia.com/gpu"]
    )
    sidecar = container(pod, "kv-events")
    assert sidecar in pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["command"] == ["prefix-worker", "kv-events"]
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])


def test_gpu_launcher_sidecar_and_router_agree(
    rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    """Launcher, sidecar and router use one worker id (the id discovery gives the pod), one
    topic and endpoint pair, the same Redis and key prefix, and the same exact-hashing inputs."""
    objects = rendered["gpu"]
    settings = router_settings(objects, "gpu", tmp_path)
    pod = one(objects, "StatefulSet", "prefix-workers")["spec"]["template"]["spec"]
    launcher = _parse(objects, "gpu", container(pod, "vllm"))
    sidecar = _parse(objects, "gpu", container(pod, "kv-events"))
    pod_ip = container_env(objects, "gpu", container(pod, "vllm"))["POD_IP"]

    assert launcher.worker_id == sidecar.worker_id == f"{pod_ip}:{settings.discovery.port}"
    assert (launcher.host, launcher.port) == ("0.0.0.0", settings.discovery.port)
    assert sidecar.topic == (launcher.kv_events_topic or f"kv-events/{launcher.worker_id}")
    assert sidecar.endpoint == launcher.kv_events_endpoint
    assert sidecar.replay_endpoint == launcher.kv_events_replay_endpoint

    assert settings.routing.hasher == "vllm"
    assert settings.exact.block_size == launcher.block_size
    assert settings.exact.hash_algo == launcher.hash_algo
    assert settings.exact.hash_seed == launcher.hash_seed
    assert str(settings.exact.model_dir) == launcher.model

    assert settings.redis.url is not None
    router_redis = urlsplit(settings.redis.url.get_secret_value())
    sidecar_redis = urlsplit(sidecar.redis_url)
    assert (sidecar_redis.hostname, sidecar_redis.port, sidecar_redis.password) == (
        router_redis.hostname,
        router_redis.port,
        router_redis.password,
    )
    assert sidecar.prefix == settings.redis.prefix
    one(objects, "Service", router_redis.hostname or "")


def test_gpu_router_reads_the_tokenizer_from_the_workers_volume(
    rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    """The routers mount the workers' model volume read-only where exact.model_dir points."""
    objects = rendered["gpu"]
    settings = router_settings(objects, "gpu", tmp_path)
    router_pod = one(objects, "Deployment", "prefix-router")["spec"]["template"]["spec"]
    worker_pod = one(objects, "StatefulSet", "prefix-workers")["spec"]["template"]["spec"]

    def claim_at(pod: Obj, name: str, path: Path) -> str:
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        for mount in container(pod, name).get("volumeMounts", []):
            if mount["name"] in claims and path.is_relative_to(mount["mountPath"]):
                assert mount.get("readOnly"), f"{name} mounts the models writable"
                return claims[mount["name"]]
        raise AssertionError(f"{name}: nothing mounted at {path}")

    assert settings.exact.model_dir is not None
    model_dir = settings.exact.model_dir
    assert claim_at(router_pod, "router", model_dir) == claim_at(worker_pod, "vllm", model_dir)
    pvc = one(objects, "PersistentVolumeClaim", claim_at(router_pod, "router", model_dir))
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
