"""Reading PromQL out of the Grafana dashboard and the alert rules: the expressions, made
parseable (Grafana's ``$variables`` replaced), and the series selectors in them.

Parsing uses ``promql-parser`` (a real PromQL grammar), so a syntax error fails the test
instead of hiding a metric name from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tests.deploy.tools import python_tool

# Series Prometheus adds for every target; alerts may use them without the router exporting them.
PROMETHEUS_SERIES = frozenset({"up"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_GRAFANA_RANGES = re.compile(r"\$(__rate_interval|__interval|__range)\b")
_GRAFANA_VARIABLE = re.compile(r"\$\{?(\w+)\}?")


@dataclass(frozen=True)
class Selector:
    """One series selector: the metric name and the labels its matchers name."""

    metric: str
    labels: frozenset[str]


@dataclass(frozen=True)
class Aggregation:
    """An aggregation's ``by`` labels and the metrics aggregated."""

    by: frozenset[str]
    metrics: frozenset[str]


def from_grafana(expr: str) -> str:
    """A dashboard query as plain PromQL: range variables become 5m, others a literal value."""
    return _GRAFANA_VARIABLE.sub("x", _GRAFANA_RANGES.sub("5m", expr))


def parse(expr: str) -> Any:
    """The syntax tree of ``expr``; raises ValueError naming the problem."""
    promql = python_tool("promql_parser", "promql-parser")
    return promql.parse(expr)


def selectors(tree: Any) -> list[Selector]:
    promql = python_tool("promql_parser", "promql-parser")
    found: list[Selector] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql.VectorSelector):
            labels = frozenset(m.name for m in node.matchers.matchers)
            found.append(Selector(node.name, labels))

    promql.walk(tree, visit)
    return found


def aggregations(tree: Any) -> list[Aggregation]:
    promql = python_tool("promql_parser", "promql-parser")
    found: list[Aggregation] = []

    def visit(node: Any) -> None:
        if (
            isinstance(node, promql.AggregateExpr)
            and node.modifier is not None
            and node.modifier.type == promql.AggModifierType.By
        ):
            metrics = frozenset(s.metric for s in selectors(node.expr))
            found.append(Aggregation(frozenset(node.modifier.labels), metrics))

    promql.walk(tree, visit)
    return found


def family(name: str, exported: set[str]) -> str | None:
    """The exported family a referenced series belongs to (histogram suffixes stripped)."""
    if name in exported:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in exported:
            return name.removesuffix(suffix)
    return None


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, rows' panels included."""
    queries: list[tuple[str, str]] = []

    def collect(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                queries.append((panel["title"], from_grafana(target["expr"])))
            collect(panel.get("panels", []))

    collect(dashboard["panels"])
    return queries


def alert_rules(rules_file: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in rules_file["groups"] for rule in group["rules"]]
