"""docs/openapi.yaml matches the app's routes, and schemathesis fuzzes the router through it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, settings

from router.app import create_admin_app, create_app
from router.config import Settings
from tests.fuzz.conftest import ADMIN_TOKEN, API_KEY, Target, examples

SPEC_PATH = Path(__file__).parents[2] / "docs" / "openapi.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
METHODS = {"get", "post", "put", "delete", "patch"}


def _registered(app_settings: dict[str, Any]) -> set[tuple[str, str]]:
    app = create_app(Settings.model_validate(app_settings))
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method.lower() in METHODS
    }
    return routes | {
        (route.method.lower(), route.resource.canonical)
        for route in create_admin_app(app).router.routes()
        if route.resource is not None and route.method.lower() in METHODS
    }


def test_spec_lists_exactly_the_registered_routes() -> None:
    """Every route the router serves is in docs/openapi.yaml, and every path there is served."""
    registered = _registered(
        {"workers": [{"url": "http://127.0.0.1:9"}], "server": {"admin_token": "t"}}
    )
    described = {
        (method, path)
        for path, item in SPEC["paths"].items()
        for method in item
        if method in METHODS
    }
    assert described == registered


def test_spec_is_valid_openapi() -> None:
    """The description loads as OpenAPI 3 and every error response uses the OpenAI error shape."""
    schema = schemathesis.from_path(str(SPEC_PATH))
    operations = list(schema.get_all_operations())
    assert len(operations) == sum(len(set(item) & METHODS) for item in SPEC["paths"].values())
    for name, response in SPEC["components"]["responses"].items():
        if name in ("Completion", "WorkerAnswer"):
            continue
        media = response["content"]["application/json"]["schema"]
        assert media == {"$ref": "#/components/schemas/Error"}, name


def _not_a_router_5xx(response: Any) -> None:
    """A 5xx is acceptable only when a worker sent it (routed answers name the worker)."""
    if response.status_code >= 500 and "x-prefix-router-worker" not in response.headers:
        raise AssertionError(f"router answered {response.status_code}: {response.text[:200]}")
    if 400 <= response.status_code < 500 and "x-prefix-router-worker" not in response.headers:
        assert response.headers.get("Content-Type", "").startswith("application/json")
        error = response.json()["error"]
        assert isinstance(error["message"], str)
        assert isinstance(error["type"], str)


@pytest.mark.parametrize(
    "operation",
    ["/v1/chat/completions", "/v1/completions", "/admin/route", "/admin/config"],
)
def test_schemathesis_finds_no_router_5xx(target: Target, operation: str) -> None:
    """Generated valid and invalid requests never get a 5xx from the router nor a crash."""
    schema = schemathesis.from_path(str(SPEC_PATH), base_url=target.url)
    token = ADMIN_TOKEN if operation.startswith("/admin") else API_KEY
    headers = {"Authorization": f"Bearer {token}"}
    ran = 0
    for op in schema.get_all_operations():
        api = op.ok()
        if api.path != operation:
            continue
        if api.path == "/admin/config" and api.method.lower() != "get":
            continue  # PUT retunes the shared router mid-fuzz

        @settings(
            max_examples=examples(25),
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=api.as_strategy())
        def _one(case: Any) -> None:
            try:
                response = case.call(headers=headers, timeout=15)
            except Exception as exc:
                raise AssertionError(f"{exc!r} for body {str(case.body)[:300]}") from None
            _not_a_router_5xx(response)

        started = time.monotonic()
        _one()
        ran += 1
        assert time.monotonic() - started < 60
    assert ran >= 1
    assert target.router.popen.poll() is None, "the router process died"
    assert "unhandled error" not in target.log_text()
