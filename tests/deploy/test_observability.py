"""The Grafana dashboard and the Prometheus alert rules parse, and every metric they query is
one a running router really exports: the test starts `prefix-router serve` (Redis index and
loads, one simulated worker), sends chat, streamed chat, completions and a malformed request,
and reads the metric families from its /metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from load_tests.procs import console_script, start
from load_tests.redis_server import RedisServer
from tests.deploy.promql import (
    PROMETHEUS_SERIES,
    aggregations,
    alert_rules,
    dashboard_queries,
    family,
    parse,
    selectors,
)
from tests.deploy.tools import REPO
from tests.integration.sim_fixtures import running_sim

DASHBOARD = REPO / "deploy" / "grafana" / "prefix-router.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"
OPERATIONS = REPO / "docs" / "operations.md"
# Labels Prometheus attaches to every scraped series (target and Kubernetes metadata).
TARGET_LABELS = frozenset({"instance", "job", "namespace", "pod", "service", "container"})
REQUIRED_ALERTS = {
    "PrefixRouterCacheHitRateDrop",
    "PrefixRouterSpillStorm",
    "PrefixRouterWorkerEjected",
    "PrefixRouterRedisFallback",
    "PrefixRouterNoHealthyWorker",
}


class Scrape:
    """Metric families of one /metrics page: name -> type, and label names seen per family."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.labels: dict[str, set[str]] = {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(maxsplit=3)
                self.types[name] = kind
                self.labels.setdefault(name, set())
            elif line and not line.startswith("#"):
                match = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s", line)
                assert match, line
                owner = family(match.group(1), set(self.types))
                if owner is not None and match.group(2):
                    names = re.findall(r'(\w+)="', match.group(2))
                    self.labels[owner].update(n for n in names if n != "le")


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrape]:
    """/metrics of a real router after a little traffic of every kind."""
    workdir = tmp_path_factory.mktemp("observability")
    redis = RedisServer(workdir)
    redis.start()
    try:
        with running_sim(workdir, "w0") as sim:
            config = workdir / "router.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "server": {"host": "127.0.0.1", "port": 0, "admin_token": "t"},
                        "workers": [{"id": "w0", "url": sim.url}],
                        "index": {"kind": "redis"},
                        "loads": {"kind": "redis"},
                        "redis": {"url": redis.url},
                        "tenants": {"salt_secret": "deploy-test"},
                        "telemetry": {"access_log": False},
                    }
                )
            )
            router = start(
                "router",
                [*console_script("prefix-router"), "serve", "--config", str(config)],
                log_path=workdir / "router.log",
                timeout=30,
            )
            try:
                yield Scrape(_traffic_then_scrape(router.url))
            finally:
                router.stop()
    finally:
        redis.stop()


def _traffic_then_scrape(url: str) -> str:
    headers = {"x-prefix-router-route": "deploy-test", "x-prefix-version": "v1"}
    system = "You are a careful assistant. " * 40
    chat = {
        "model": "sim-model",
        "max_tokens": 4,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}],
    }
    with httpx.Client(base_url=url, timeout=30, headers=headers) as client:
        for _ in range(2):  # the second one finds the prefix warm
            assert client.post("/v1/chat/completions", json=chat).status_code == 200
        with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as rsp:
            assert rsp.status_code == 200
            assert "[DONE]" in "".join(rsp.iter_text())
        completion = {"model": "sim-model", "prompt": system, "max_tokens": 4}
        assert client.post("/v1/completions", json=completion).status_code == 200
        assert client.post("/v1/chat/completions", content=b"{not json").status_code == 400
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        return metrics.text


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _alerts() -> list[dict[str, Any]]:
    return alert_rules(yaml.safe_load(ALERTS.read_text()))


def _all_queries() -> list[tuple[str, str]]:
    queries = dashboard_queries(_dashboard())
    queries += [(rule["alert"], rule["expr"]) for rule in _alerts()]
    return queries


def test_the_scrape_saw_the_traffic(scrape: Scrape) -> None:
    """The router under test exported latency histograms, token counters and backend state."""
    assert scrape.types["prefix_router_ttft_seconds"] == "histogram"
    assert {"route", "tenant", "prefix_version"} <= scrape.labels[
        "prefix_router_prompt_tokens_total"
    ]
    assert "backend" in scrape.labels["prefix_router_backend_up"]


def test_every_query_parses() -> None:
    """Every dashboard query and alert expression is valid PromQL."""
    failures = []
    for where, expr in _all_queries():
        try:
            parse(expr)
        except ValueError as exc:
            failures.append(f"{where}: {exc}")
    assert failures == []


def test_queries_use_only_exported_metrics(scrape: Scrape) -> None:
    """Every metric the dashboard and the alerts query is one the router exports (or `up`)."""
    exported = set(scrape.types)
    unknown = sorted(
        f"{where}: {s.metric}"
        for where, expr in _all_queries()
        for s in selectors(parse(expr))
        if family(s.metric, exported) is None and s.metric not in PROMETHEUS_SERIES
    )
    assert unknown == []


def test_queries_use_labels_the_metrics_have(scrape: Scrape) -> None:
    """Label matchers and `by` labels name labels the metrics carry (or the target's labels);
    families without a sample in the scrape (no errors happened) are not checked."""
    exported = set(scrape.types)
    wrong: list[str] = []
    for where, expr in _all_queries():
        tree = parse(expr)
        for s in selectors(tree):
            owner = family(s.metric, exported)
            if owner is None or not scrape.labels[owner]:
                continue  # no sample of it in this scrape: its labels are unknown
            extra = s.labels - scrape.labels[owner] - TARGET_LABELS - {"le"}
            if extra:
                wrong.append(f"{where}: {s.metric} has no label {sorted(extra)}")
        for aggregation in aggregations(tree):
            owners = [family(m, exported) for m in aggregation.metrics]
            if not owners or any(o is None or not scrape.labels[o] for o in owners):
                continue
            known = set().union(*(scrape.labels[o] for o in owners if o is not None))
            extra = aggregation.by - known - TARGET_LABELS - {"le"}
            if extra:
                wrong.append(f"{where}: grouped by {sorted(extra)} that no metric has")
    assert wrong == []


def test_dashboard_shows_what_operators_need() -> None:
    """The dashboard has the cached-token ratio by route, tenant group and prefix version, hit
    available vs captured, TTFT and inter-token quantiles, per-worker load, spill rate,
    ejections and the Redis fallback signals."""
    queries = [expr for _, expr in dashboard_queries(_dashboard())]
    trees = [parse(q) for q in queries]
    by_labels = {
        label
        for tree in trees
        for a in aggregations(tree)
        if "prefix_router_cached_tokens_total" in a.metrics
        for label in a.by
    }
    assert {"route", "tenant", "prefix_version"} <= by_labels
    used = {s.metric for tree in trees for s in selectors(tree)}
    assert {
        "prefix_router_blocks_available_total",
        "prefix_router_blocks_captured_total",
        "prefix_router_ttft_seconds_bucket",
        "prefix_router_inter_token_seconds_bucket",
        "prefix_router_worker_inflight",
        "prefix_router_worker_ejections_total",
        "prefix_router_backend_up",
        "prefix_router_index_errors_total",
    } <= used
    assert any('reason="spill"' in q for q in queries)
    assert any(q.startswith("histogram_quantile(0.99") and "ttft" in q for q in queries)


def test_dashboard_is_importable() -> None:
    """The dashboard has a stable uid, a data-source variable every panel uses, unique panel
    ids and a layout inside Grafana's 24 columns."""
    dashboard = _dashboard()
    assert dashboard["uid"] == "prefix-router"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
    for name in ("route", "tenant", "prefix_version", "worker"):
        assert variables[name]["definition"].startswith("label_values(prefix_router_")


def test_alert_rules_cover_the_failures_operators_act_on() -> None:
    """The rules include hit-rate drop, spill storm, worker ejected, Redis fallback and no
    healthy worker; each has a severity, a summary, a description and a runbook section in
    docs/operations.md."""
    rules = _alerts()
    names = {rule["alert"] for rule in rules}
    assert names >= REQUIRED_ALERTS
    anchors = _anchors(OPERATIONS.read_text())
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
        page, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert page == "docs/operations.md"
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in {page}"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors of a Markdown page."""
    anchors = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


def test_compose_prometheus_loads_the_rules_and_grafana_the_dashboard() -> None:
    """compose.yaml's Prometheus scrapes the routers as job prefix-router (the job the alerts
    name) and loads alerts.yaml; Grafana provisions the dashboard file."""
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yaml"]
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert "prefix-router" in jobs
    assert any('job="prefix-router"' in rule["expr"] for rule in _alerts())
    provider = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/dashboards/prefix-router.yaml").read_text()
    )
    compose = (REPO / "deploy" / "compose.yaml").read_text()
    folder = provider["providers"][0]["options"]["path"]
    assert f"./grafana/prefix-router.json:{folder}/prefix-router.json" in compose
    assert Path(DASHBOARD).is_file()
