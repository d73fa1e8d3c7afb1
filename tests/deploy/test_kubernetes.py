"""The Kubernetes manifests render, match the API schemas, and hold together: the router's
settings load from them, discovery names the workers' headless Service, the pods are locked
down, the ingress streams (network policies: test_network_policies.py)."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest

from tests.deploy.manifests import (
    EXTERNAL_SECRETS,
    K8S,
    OVERLAYS,
    Obj,
    container,
    containers,
    find,
    load_yaml,
    one,
    pod_templates,
    render,
    router_settings,
    selects,
)
from tests.deploy.tools import REPO, python_tool

# The oldest Kubernetes the manifests support (native sidecar containers: 1.29) and the newest
# whose schemas kubernetes-validate ships.
OLDEST_KUBERNETES = "1.29.0"
SCHEMAS = Path(__file__).parent / "schemas"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SCHEMAS / "servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): SCHEMAS / "prometheusrule.json",
}
# Containers that may write to their image's filesystem, and why (the manifest says it too).
WRITABLE_ROOT = {"vllm": "vLLM, torch and triton write compile caches in release-dependent places"}


def _latest_kubernetes() -> str:
    validate = python_tool("kubernetes_validate", "kubernetes-validate")
    return str(validate.latest_version())


def _schema_errors(obj: Obj, version: str) -> list[str]:
    key = (obj["apiVersion"], obj["kind"])
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    if key in CRD_SCHEMAS:
        schema = json.loads(CRD_SCHEMAS[key].read_text())
        validator = jsonschema.Draft202012Validator(schema)
        return [
            f"{name}: {'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)
        ]
    validate = python_tool("kubernetes_validate", "kubernetes-validate")
    try:
        validate.validate(obj, version, strict=True)
    except validate.ValidationError as exc:
        return [f"{name}: {'.'.join(map(str, exc.path))}: {exc.message}"]
    except validate.SchemaNotFoundError:
        return [f"{name}: no schema for {obj['apiVersion']} {obj['kind']} in Kubernetes {version}"]
    return []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_into_one_namespace(rendered: dict[str, list[Obj]], overlay: str) -> None:
    """`kubectl kustomize` renders the overlay, everything in the prefix-router namespace and
    labelled as part of prefix-router (so `kubectl get all -l ...` finds it all)."""
    objects = rendered[overlay]
    assert find(objects, "Namespace", "prefix-router")
    outside = [
        f"{o['kind']}/{o['metadata']['name']}"
        for o in objects
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != "prefix-router"
    ]
    assert outside == []
    unlabelled = [
        f"{o['kind']}/{o['metadata']['name']}"
        for o in objects
        if o["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") != "prefix-router"
    ]
    assert unlabelled == []


def test_overlays_are_the_documented_ones() -> None:
    """The overlays are dev (simulated CPU workers) and gpu (vLLM)."""
    assert OVERLAYS == ["dev", "gpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "latest"])
def test_objects_match_the_api_schemas(
    rendered: dict[str, list[Obj]], overlay: str, version: str
) -> None:
    """Every rendered object validates (strictly: no unknown fields) against its API schema."""
    target = _latest_kubernetes() if version == "latest" else version
    errors = [error for obj in rendered[overlay] for error in _schema_errors(obj, target)]
    assert errors == []


def test_schema_check_rejects_a_misspelt_field(rendered: dict[str, list[Obj]]) -> None:
    """The schema check is strict: a misspelt field in a Deployment or ServiceMonitor fails."""
    objects = rendered["gpu"]
    deployment = copy.deepcopy(one(objects, "Deployment", "prefix-router"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    monitor = copy.deepcopy(one(objects, "ServiceMonitor", "prefix-router"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert _schema_errors(deployment, OLDEST_KUBERNETES)
    assert _schema_errors(monitor, OLDEST_KUBERNETES)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_router_settings_load(rendered: dict[str, list[Obj]], overlay: str, tmp_path: Path) -> None:
    """The router's ConfigMap plus its environment (Secret values) is valid settings, with the
    warm index and loads in Redis and workers discovered through DNS."""
    settings = router_settings(rendered[overlay], overlay, tmp_path)
    assert settings.index.kind == "redis"
    assert settings.loads.kind == "redis"
    assert settings.discovery.kind == "dns"
    assert settings.server.host == "0.0.0.0"
    assert settings.tenants.salt_secret is not None
    assert settings.server.admin_token is not None
    assert settings.tenants.api_keys
    redis_url = settings.redis.url
    assert redis_url is not None
    assert "$(" not in redis_url.get_secret_value()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_discovery_names_the_workers_headless_service(
    rendered: dict[str, list[Obj]], overlay: str, tmp_path: Path
) -> None:
    """The router resolves a headless Service that selects the worker pods, on their API port."""
    objects = rendered[overlay]
    discovery = router_settings(objects, overlay, tmp_path).discovery
    assert discovery.name is not None
    service_name, namespace, *suffix = discovery.name.split(".")
    assert suffix == ["svc", "cluster", "local"]
    service = one(objects, "Service", service_name)
    assert service["metadata"]["namespace"] == namespace
    assert service["spec"].get("clusterIP") == "None"
    assert not service["spec"].get("publishNotReadyAddresses", False)
    workers = [
        (workload, template)
        for workload, template in pod_templates(objects)
        if selects(service["spec"]["selector"], template["metadata"]["labels"])
    ]
    assert len(workers) == 1
    workload, template = workers[0]
    assert workload["kind"] == "StatefulSet"
    assert workload["spec"]["serviceName"] == service_name
    ports = {
        port["name"]: port["containerPort"]
        for spec in containers(template["spec"])
        for port in spec.get("ports", [])
    }
    assert ports["http"] == discovery.port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_router_drains_before_it_is_killed(
    rendered: dict[str, list[Obj]], overlay: str, tmp_path: Path
) -> None:
    """Router pods leave the endpoints (preStop pause), then get server.shutdown_grace_s to
    finish their streams before Kubernetes kills them; probes use /ready and /health."""
    objects = rendered[overlay]
    settings = router_settings(objects, overlay, tmp_path)
    pod = one(objects, "Deployment", "prefix-router")["spec"]["template"]["spec"]
    router = container(pod, "router")
    pause = router["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pause[1]) + settings.server.shutdown_grace_s
    assert router["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert router["livenessProbe"]["httpGet"]["path"] == "/health"
    assert router["startupProbe"]["httpGet"]["path"] == "/health"
    port = router["ports"][0]
    assert (port["name"], port["containerPort"]) == ("http", settings.server.port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_router_stays_available(rendered: dict[str, list[Obj]], overlay: str) -> None:
    """At least two router replicas (the HPA owns the count: a fixed one would be reset by
    every apply), spread over nodes, protected by a disruption budget; rollouts never go below
    the current count."""
    objects = rendered[overlay]
    deployment = one(objects, "Deployment", "prefix-router")
    spec = deployment["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert "replicas" not in spec
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    spread = spec["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} >= {"kubernetes.io/hostname"}
    assert all(selects(c["labelSelector"]["matchLabels"], labels) for c in spread)
    hpa = one(objects, "HorizontalPodAutoscaler", "prefix-router")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "prefix-router",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    resources = container(spec["template"]["spec"], "router")["resources"]
    assert "cpu" in resources["requests"]  # the HPA's utilisation is relative to it
    pdb = one(objects, "PodDisruptionBudget", "prefix-router")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down(rendered: dict[str, list[Obj]], overlay: str) -> None:
    """Every pod runs as non-root with the RuntimeDefault seccomp profile, every container
    drops all capabilities, cannot escalate, has memory bounds and a pinned image, and only
    the listed containers may write to their root filesystem."""
    problems: list[str] = []
    for workload, template in pod_templates(rendered[overlay]):
        pod = template["spec"]
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        context = pod.get("securityContext", {})
        if not context.get("runAsNonRoot") or context.get("runAsUser", 0) == 0:
            problems.append(f"{where}: not runAsNonRoot with a non-zero runAsUser")
        if context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: seccompProfile is not RuntimeDefault")
        if pod.get("automountServiceAccountToken", True):
            problems.append(f"{where}: mounts a service-account token it does not need")
        for spec in containers(pod):
            name = f"{where}/{spec['name']}"
            security = spec.get("securityContext", {})
            if security.get("allowPrivilegeEscalation", True):
                problems.append(f"{name}: allowPrivilegeEscalation")
            if security.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{name}: capabilities not dropped")
            if not security.get("readOnlyRootFilesystem") and spec["name"] not in WRITABLE_ROOT:
                problems.append(f"{name}: writable root filesystem")
            resources = spec.get("resources", {})
            if "memory" not in resources.get("requests", {}) or "memory" not in resources.get(
                "limits", {}
            ):
                problems.append(f"{name}: no memory request and limit")
            if not re.fullmatch(r"[\w./-]+:[\w.-]+", _image(rendered[overlay], spec["image"])):
                problems.append(f"{name}: image {spec['image']!r} has no tag")
    assert problems == []


def _image(objects: list[Obj], image: str) -> str:
    return image if ":" in image else image + ":<untagged>"


def test_pods_meet_the_restricted_pod_security_standard(rendered: dict[str, list[Obj]]) -> None:
    """The namespace enforces the restricted Pod Security Standard (so the checks above hold
    for anything deployed there later too)."""
    for objects in rendered.values():
        labels = one(objects, "Namespace", "prefix-router")["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_streams_and_limits_bodies_like_the_router(
    rendered: dict[str, list[Obj]], overlay: str, tmp_path: Path
) -> None:
    """The ingress passes SSE chunks through unbuffered, waits longer than the router would for
    a worker, refuses the same body sizes, retries a draining replica's 503 elsewhere, and
    publishes only the OpenAI API."""
    objects = rendered[overlay]
    settings = router_settings(objects, overlay, tmp_path)
    ingress = one(objects, "Ingress", "prefix-router")
    notes = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert notes[prefix + "proxy-buffering"] == "off"
    assert notes[prefix + "proxy-request-buffering"] == "off"
    read_timeout = int(notes[prefix + "proxy-read-timeout"])
    assert read_timeout >= settings.upstream.first_byte_timeout_s
    assert read_timeout >= settings.upstream.idle_timeout_s
    assert int(notes[prefix + "proxy-send-timeout"]) >= settings.upstream.idle_timeout_s
    assert _nginx_size(notes[prefix + "proxy-body-size"]) == settings.server.max_body_bytes
    # A draining replica's 503 shutting_down is retried on another one.
    assert "http_503" in notes[prefix + "proxy-next-upstream"].split()
    paths = [p["path"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert paths == ["/v1"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    service = one(objects, "Service", backend["name"])
    assert backend["port"]["name"] in {port["name"] for port in service["spec"]["ports"]}


def _nginx_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", text)
    assert match, f"not an nginx size: {text!r}"
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]
    return int(match.group(1)) * scale


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(rendered: dict[str, list[Obj]], overlay: str) -> None:
    """Every ConfigMap, Secret, volume claim and service account a pod uses is rendered (or is
    one the operator creates, as documented), and every Service selects pods with its ports."""
    objects = rendered[overlay]
    external = set(EXTERNAL_SECRETS.get(overlay, {}))
    missing: list[str] = []

    def need(kind: str, name: str, optional: bool = False) -> None:
        operator_made = kind == "Secret" and name in external
        if not find(objects, kind, name) and not optional and not operator_made:
            missing.append(f"{kind}/{name}")

    for _, template in pod_templates(objects):
        pod = template["spec"]
        need("ServiceAccount", pod.get("serviceAccountName", "default"), optional=True)
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                need("ConfigMap", volume["configMap"]["name"])
            if "secret" in volume:
                need("Secret", volume["secret"]["secretName"])
            if "persistentVolumeClaim" in volume:
                need("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        for spec in containers(pod):
            for item in spec.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    need("Secret", ref["name"], optional=ref.get("optional", False))
    assert missing == []
    for service in find(objects, "Service"):
        pods = [
            t["spec"]
            for _, t in pod_templates(objects)
            if selects(service["spec"]["selector"], t["metadata"]["labels"])
        ]
        assert pods, f"Service {service['metadata']['name']} selects no pods"
        named = {p["name"] for pod in pods for c in containers(pod) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named, f"{service['metadata']['name']}: {port}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitors_find_their_metrics_ports(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    """Each ServiceMonitor selects a Service that has the port it scrapes (the gpu overlay
    has the Prometheus Operator component, the dev overlay leaves it out)."""
    objects = rendered[overlay]
    monitors = find(objects, "ServiceMonitor")
    if overlay == "gpu":
        assert {m["metadata"]["name"] for m in monitors} == {"prefix-router", "prefix-kv-events"}
    else:
        assert monitors == []
    for monitor in monitors:
        services = [
            s
            for s in find(objects, "Service")
            if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert services, f"ServiceMonitor {monitor['metadata']['name']} selects no Service"
        ports = {p["name"] for s in services for p in s["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports


def test_monitoring_component_also_fits_the_dev_overlay(tmp_path: Path) -> None:
    """Adding the Prometheus Operator component to the dev overlay (as its comment says)
    renders valid objects, and the router's ServiceMonitor finds the router Service."""
    here = Path(os.path.relpath(K8S, tmp_path))
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        "namespace: prefix-router\n"
        f"resources: [{here / 'overlays' / 'dev'}]\n"
        f"components: [{here / 'components' / 'prometheus-operator'}]\n"
    )
    objects = render(tmp_path)
    monitor = one(objects, "ServiceMonitor", "prefix-router")
    one(objects, "PrometheusRule", "prefix-router")
    errors = [e for obj in objects for e in _schema_errors(obj, OLDEST_KUBERNETES)]
    assert errors == []
    service = one(objects, "Service", "prefix-router")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])


def test_prometheus_rule_carries_the_alert_rules_file(rendered: dict[str, list[Obj]]) -> None:
    """The PrometheusRule holds exactly the groups of deploy/prometheus/alerts.yaml."""
    plain = load_yaml(REPO / "deploy" / "prometheus" / "alerts.yaml")
    assert one(rendered["gpu"], "PrometheusRule", "prefix-router")["spec"] == plain


def test_redis_refuses_to_evict_and_fits_its_limit(rendered: dict[str, list[Obj]]) -> None:
    """Redis runs with maxmemory-policy noeviction and a maxmemory below its memory limit."""
    for objects in rendered.values():
        pod = one(objects, "Deployment", "redis")["spec"]["template"]["spec"]
        redis = container(pod, "redis")
        args = redis["args"]
        assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
        maxmemory = _bytes(args[args.index("--maxmemory") + 1])
        assert maxmemory < _bytes(redis["resources"]["limits"]["memory"])
        assert "--requirepass" in args


def _bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+)(gb|mb|kb|Gi|Mi|Ki|)", text)
    assert match, text
    units = {"": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3, "Ki": 1024, "Mi": 1024**2}
    units["Gi"] = 1024**3
    return int(match.group(1)) * units[match.group(2)]
