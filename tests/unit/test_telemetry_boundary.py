"""Only `router.telemetry` talks to prometheus_client and OpenTelemetry, so metric names,
the tracer provider and their cost stay in one module. (Reading a worker's exposition text
with prometheus_client's parser, in `router.scrape`, exports nothing and is allowed.)"""

from __future__ import annotations

import ast
from pathlib import Path

import router

ROUTER = Path(router.__file__).resolve().parent
TELEMETRY_LIBRARIES = ("opentelemetry", "prometheus_client")
PARSER_ONLY = "prometheus_client.parser"


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_only_telemetry_imports_metrics_and_tracing_libraries() -> None:
    """No router module but telemetry.py imports prometheus_client or opentelemetry."""
    offenders = sorted(
        str(path.relative_to(ROUTER))
        for path in ROUTER.rglob("*.py")
        if path.name != "telemetry.py" or path.parent != ROUTER
        for name in _imported(path)
        if name.split(".")[0] in TELEMETRY_LIBRARIES and name != PARSER_ONLY
    )
    assert offenders == []
    assert {"opentelemetry", "prometheus_client"} <= {
        name.split(".")[0] for name in _imported(ROUTER / "telemetry.py")
    }
