"""Metric series that dashboards and alerts rely on: present from the start, and gone with
the worker they describe (so discovery churn cannot grow the series without bound)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from router.config import TelemetrySettings
from router.telemetry import UPSTREAM_ERROR_KINDS, Metrics


def _series(metrics: Metrics) -> list[tuple[str, dict[str, str]]]:
    text = metrics.render().decode()
    return [
        (sample.name, dict(sample.labels))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def test_discovery_and_reload_series_exist_at_zero_before_any_event() -> None:
    """A fresh router exports the discovery and reload counters at 0 for every label value."""
    series = _series(Metrics(TelemetrySettings()))
    for result in ("ok", "error"):
        assert ("prefix_router_discovery_resolutions_total", {"result": result}) in series
    for change in ("added", "removed"):
        assert ("prefix_router_discovery_changes_total", {"change": change}) in series
    for source in ("sighup", "admin"):
        for result in ("applied", "unchanged", "rejected"):
            labels = {"source": source, "result": result}
            assert ("prefix_router_reloads_total", labels) in series
    assert ("prefix_router_reload_restart_required", {}) in series


def test_a_removed_worker_leaves_no_series_behind() -> None:
    """Every series labelled with a worker disappears when that worker leaves the pool."""
    metrics = Metrics(TelemetrySettings())
    for worker in ("10.0.0.1:8000", "10.0.0.2:8000"):
        metrics.worker_added(worker)
        metrics.index_blocks.labels(worker).set(5)
        metrics.upstream_seconds.labels(worker).observe(0.1)
        metrics.ejections.labels(worker).inc()
        for kind in UPSTREAM_ERROR_KINDS:
            metrics.upstream_errors.labels(worker, kind).inc()
    metrics.worker_removed("10.0.0.1:8000")
    workers = {labels.get("worker") for _, labels in _series(metrics)} - {None}
    assert workers == {"10.0.0.2:8000"}
