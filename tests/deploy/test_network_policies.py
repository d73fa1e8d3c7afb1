"""The network policies admit exactly the intended traffic: clients reach only the router,
only the router and the workers' pods (the KV-event sidecar) reach Redis, only the router
reaches the workers' API port, and Prometheus reaches the sidecars' metrics. A small evaluator
of NetworkPolicy ingress rules checks each pair against the rendered policies."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.manifests import OVERLAYS, Obj, containers, find, pod_templates, selects

_PODS: dict[str, dict[str, Any]] = {
    # who: (namespace labels, pod labels)
    "router": ({"kubernetes.io/metadata.name": "prefix-router"}, "router"),
    "worker": ({"kubernetes.io/metadata.name": "prefix-router"}, "worker"),
    "redis": ({"kubernetes.io/metadata.name": "prefix-router"}, "redis"),
    "stranger in the namespace": (
        {"kubernetes.io/metadata.name": "prefix-router"},
        {"app.kubernetes.io/name": "debug-shell"},
    ),
    "client in another namespace": ({"kubernetes.io/metadata.name": "apps"}, {"app": "client"}),
    "ingress controller": (
        {"kubernetes.io/metadata.name": "ingress-nginx"},
        {"app.kubernetes.io/name": "ingress-nginx"},
    ),
    "prometheus": (
        {"kubernetes.io/metadata.name": "monitoring"},
        {"app.kubernetes.io/name": "prometheus"},
    ),
}


def _pod(objects: list[Obj], who: str) -> tuple[dict[str, str], dict[str, str], Obj | None]:
    """(namespace labels, pod labels, pod spec or None) of a named actor."""
    namespace_labels, pod = _PODS[who]
    if isinstance(pod, dict):
        return namespace_labels, pod, None
    for _, template in pod_templates(objects):
        if template["metadata"]["labels"].get("app.kubernetes.io/component") == pod:
            return namespace_labels, template["metadata"]["labels"], template["spec"]
    raise AssertionError(f"no {pod} pods")


def _allowed(objects: list[Obj], source: str, target: str, port_name: str) -> bool:
    """Whether the rendered NetworkPolicies let ``source`` open ``port_name`` on ``target``."""
    src_ns, src_labels, _ = _pod(objects, source)
    _, dst_labels, dst_spec = _pod(objects, target)
    assert dst_spec is not None
    ports = {
        p["name"]: p["containerPort"] for c in containers(dst_spec) for p in c.get("ports", [])
    }
    assert port_name in ports, f"{target} has no port {port_name}"
    policies = [
        p
        for p in find(objects, "NetworkPolicy")
        if "Ingress" in p["spec"]["policyTypes"]
        and selects(p["spec"]["podSelector"].get("matchLabels", {}), dst_labels)
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            port_ok = not rule.get("ports") or any(
                p["port"] in (port_name, ports[port_name]) for p in rule["ports"]
            )
            peer_ok = not rule.get("from") or any(
                _peer_matches(peer, src_ns, src_labels) for peer in rule["from"]
            )
            if port_ok and peer_ok:
                return True
    return False


def _peer_matches(peer: Obj, src_ns: dict[str, str], src_labels: dict[str, str]) -> bool:
    same_namespace = src_ns.get("kubernetes.io/metadata.name") == "prefix-router"
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"].get("matchLabels", {}), src_ns):
            return False
    elif not same_namespace:
        return False
    if "podSelector" in peer:
        return selects(peer["podSelector"].get("matchLabels", {}), src_labels)
    return True


ALLOWED = [
    ("client in another namespace", "router", "http"),
    ("ingress controller", "router", "http"),
    ("prometheus", "router", "http"),
    ("router", "redis", "redis"),
    ("worker", "redis", "redis"),
    ("router", "worker", "http"),
]
REFUSED = [
    ("client in another namespace", "redis", "redis"),
    ("stranger in the namespace", "redis", "redis"),
    ("client in another namespace", "worker", "http"),
    ("stranger in the namespace", "worker", "http"),
    ("ingress controller", "worker", "http"),
    ("prometheus", "worker", "http"),
    ("worker", "worker", "http"),
    ("redis", "worker", "http"),
]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_admit_exactly_the_intended_traffic(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    """Clients reach only the router; only the router and the workers' sidecars reach Redis;
    only the router reaches the workers' API port."""
    objects = rendered[overlay]
    wrong = [f"{s} -> {t}:{p} refused" for s, t, p in ALLOWED if not _allowed(objects, s, t, p)]
    wrong += [f"{s} -> {t}:{p} allowed" for s, t, p in REFUSED if _allowed(objects, s, t, p)]
    assert wrong == []


def test_prometheus_scrapes_the_sidecars_but_not_vllm(rendered: dict[str, list[Obj]]) -> None:
    """On GPU workers Prometheus reaches the KV-event sidecar's metrics port, not vLLM's API."""
    objects = rendered["gpu"]
    assert _allowed(objects, "prometheus", "worker", "kv-metrics")
    assert not _allowed(objects, "client in another namespace", "worker", "kv-metrics")
