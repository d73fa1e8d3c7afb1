"""Telemetry: bounded label values, per-app metric registries, and one-line JSON logs."""

from __future__ import annotations

import json
import logging
import sys

from router.config import TelemetrySettings
from router.telemetry import OTHER, JsonFormatter, LabelCap, Metrics


def test_label_cap_keeps_the_first_values_and_folds_the_rest() -> None:
    """Only the first `limit` distinct values get their own label; newcomers become 'other'."""
    cap = LabelCap(3)
    assert [cap(v) for v in ("a", "b", "a", "c")] == ["a", "b", "a", "c"]
    assert cap("d") == OTHER
    assert cap("e") == OTHER
    # Values admitted before the cap filled keep their label.
    assert cap("b") == "b"


def test_label_cap_bounds_series_under_many_values() -> None:
    """However many tenants appear, at most limit + 1 label values are ever produced."""
    cap = LabelCap(10)
    produced = {cap(f"tenant-{i}") for i in range(10_000)}
    assert len(produced) == 11
    assert OTHER in produced


def _metrics(limit: int = 64) -> Metrics:
    return Metrics(TelemetrySettings(label_limit=limit))


def test_two_metrics_instances_do_not_share_a_registry() -> None:
    """Two routers in one process count separately (no global registry)."""
    first, second = _metrics(), _metrics()
    first.retries.labels("chat").inc(3)
    assert b'prefix_router_retries_total{route="chat"} 3.0' in first.render()
    assert b"prefix_router_retries_total{" not in second.render()


EXPECTED_NAMES = [
    "prefix_router_requests_total",
    "prefix_router_decisions_total",
    "prefix_router_prompt_tokens_total",
    "prefix_router_cached_tokens_total",
    "prefix_router_blocks_total",
    "prefix_router_blocks_available_total",
    "prefix_router_blocks_captured_total",
    "prefix_router_ttft_seconds",
    "prefix_router_inter_token_seconds",
    "prefix_router_request_seconds",
    "prefix_router_upstream_headers_seconds",
    "prefix_router_routing_seconds",
    "prefix_router_index_lookup_seconds",
    "prefix_router_index_errors_total",
    "prefix_router_index_mispredicted_total",
    "prefix_router_index_blocks",
    "prefix_router_worker_inflight",
    "prefix_router_worker_healthy",
    "prefix_router_worker_ejections_total",
    "prefix_router_upstream_errors_total",
    "prefix_router_retries_total",
    "prefix_router_stream_errors_total",
    "prefix_router_client_errors_total",
]


def test_rendered_metrics_contain_the_documented_names() -> None:
    """/metrics exposes every series dashboards and alerts rely on, with help and type lines."""
    text = _metrics().render().decode()
    for name in EXPECTED_NAMES:
        assert f"# HELP {name} " in text, name
        assert f"# TYPE {name} " in text, name
    assert "_created" not in text


def test_recorded_values_show_up_with_their_labels() -> None:
    """Counters, histograms and gauges render the values and labels that were recorded."""
    metrics = _metrics()
    metrics.requests.labels("chat", "cache_aware", "warm", "200").inc()
    metrics.cached_tokens.labels("chat", "acme", "v1").inc(96)
    metrics.ttft.labels("chat").observe(0.02)
    metrics.inflight.labels("w1").set(4)
    text = metrics.render().decode()
    assert (
        'prefix_router_requests_total{policy="cache_aware",reason="warm",route="chat",'
        'status="200"} 1.0' in text
    )
    assert (
        'prefix_router_cached_tokens_total{prefix_version="v1",route="chat",tenant="acme"} 96.0'
        in text
    )
    assert 'prefix_router_ttft_seconds_bucket{le="0.025",route="chat"} 1.0' in text
    assert 'prefix_router_worker_inflight{worker="w1"} 4.0' in text


def test_worker_added_and_removed_manage_per_worker_series() -> None:
    """A new worker shows as healthy with zero in flight; a removed one's gauges disappear."""
    metrics = _metrics()
    metrics.worker_added("w1")
    text = metrics.render().decode()
    assert 'prefix_router_worker_healthy{worker="w1"} 1.0' in text
    assert 'prefix_router_worker_inflight{worker="w1"} 0.0' in text
    assert 'prefix_router_worker_ejections_total{worker="w1"} 0.0' in text
    metrics.worker_removed("w1")
    metrics.worker_removed("never-added")
    text = metrics.render().decode()
    assert 'prefix_router_worker_healthy{worker="w1"}' not in text
    assert 'prefix_router_worker_inflight{worker="w1"}' not in text


def test_metrics_label_caps_follow_the_setting() -> None:
    """The tenant, route and version caps use telemetry.label_limit, each on its own."""
    metrics = _metrics(limit=2)
    assert [metrics.tenant_label(t) for t in ("a", "b", "c")] == ["a", "b", OTHER]
    assert metrics.route_label("x") == "x"
    assert metrics.version_label("v1") == "v1"


def _record(msg: str, *args: object, **attrs: object) -> logging.LogRecord:
    record = logging.LogRecord("prefix_router.test", logging.INFO, __file__, 1, msg, args, None)
    for key, value in attrs.items():
        setattr(record, key, value)
    return record


def test_json_formatter_emits_one_json_object_with_extra_fields() -> None:
    """Each log line is a single JSON object carrying the message and the extra fields."""
    record = _record(
        "request %s\ndone", "r1", fields={"request_id": "r1", "status": 200, "worker": None}
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["msg"] == "request r1\ndone"
    assert entry["level"] == "info"
    assert entry["logger"] == "prefix_router.test"
    assert entry["request_id"] == "r1"
    assert entry["status"] == 200
    assert entry["worker"] is None
    assert isinstance(entry["ts"], float)


def test_json_formatter_handles_odd_values_and_exceptions() -> None:
    """Values JSON cannot express are stringified, and exceptions are kept in one field."""
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        exc_info = sys.exc_info()
    record = _record("failed", fields={"path": object(), "ids": (1, 2)})
    record.exc_info = exc_info
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["path"].startswith("<object object")
    assert entry["ids"] == [1, 2]
    assert "RuntimeError: boom" in entry["exc"]


def test_json_formatter_without_fields() -> None:
    """A plain log call gives the base keys only."""
    entry = json.loads(JsonFormatter().format(_record("hello")))
    assert set(entry) == {"ts", "level", "logger", "msg"}


def test_cached_children_count_into_the_rendered_series() -> None:
    """Counts made through the cached `child` accessor show up like `labels()` counts."""
    metrics = Metrics(TelemetrySettings())
    for _ in range(3):
        metrics.child(metrics.requests, "chat", "cache_aware", "warm", "200").inc()
    assert metrics.child(metrics.requests, "chat", "cache_aware", "warm", "200") is (
        metrics.requests.labels("chat", "cache_aware", "warm", "200")
    )
    text = metrics.render().decode()
    assert (
        'prefix_router_requests_total{policy="cache_aware",reason="warm",route="chat",'
        'status="200"} 3.0' in text
    )


def test_a_readded_worker_counts_into_fresh_series() -> None:
    """After a worker leaves and comes back, its per-worker series count again from zero."""
    metrics = Metrics(TelemetrySettings())
    metrics.worker_added("w1")
    metrics.child(metrics.inflight, "w1").inc()
    metrics.child(metrics.upstream_seconds, "w1").observe(0.01)
    metrics.worker_removed("w1")
    assert 'worker="w1"' not in metrics.render().decode()
    metrics.worker_added("w1")
    metrics.child(metrics.inflight, "w1").inc()
    metrics.child(metrics.upstream_seconds, "w1").observe(0.01)
    text = metrics.render().decode()
    assert 'prefix_router_worker_inflight{worker="w1"} 1.0' in text
    assert 'prefix_router_upstream_headers_seconds_count{worker="w1"} 1.0' in text


def test_json_formatter_keeps_json_dumps_output_for_non_ascii_and_nested_values() -> None:
    """Non-ASCII text is escaped and nested values rendered exactly as json.dumps does."""
    fields = {"tenant": "café", "tried": ["w1", "w2"], "status": 502, "ms": 1.25, "ok": False}
    line = JsonFormatter().format(_record("retry", fields=fields))
    assert "\\u00e9" in line
    assert json.loads(line)["tried"] == ["w1", "w2"]
    plain = JsonFormatter().format(_record("ok", fields={"status": 200, "ms": 1.25, "x": None}))
    entry = json.loads(plain)
    assert plain == json.dumps(entry, separators=(",", ":"))
