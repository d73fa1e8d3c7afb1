"""Reload classification: which changed fields apply live, which need a restart, and how the
running settings are combined with the new ones."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from router.config import Settings
from router.reload import LIVE, changed_fields, is_live, with_live_fields


def _settings(**sections: Any) -> Settings:
    return Settings.model_validate({"workers": [{"url": "http://a:8000"}], **sections})


def test_changed_fields_names_each_field_that_differs() -> None:
    """The diff names fields as section.field, the worker list as a whole."""
    old = _settings()
    new = _settings(
        workers=[{"url": "http://b:8000"}],
        routing={"load_factor": 2.0},
        tenants={"api_keys": [{"tenant": "t", "key": "k"}]},
    )
    assert changed_fields(old, new) == ["workers", "routing.load_factor", "tenants.api_keys"]
    assert changed_fields(old, old) == []


def test_a_changed_secret_is_seen_as_a_change() -> None:
    """Secrets compare by value, so rotating the salt secret or a key is a change."""
    old = _settings(tenants={"salt_secret": "one"})
    new = _settings(tenants={"salt_secret": "two"})
    assert changed_fields(old, new) == ["tenants.salt_secret"]


@pytest.mark.parametrize(
    "path",
    ["routing.load_factor", "routing.policy", "workers", "tenants.api_keys",
     "tenants.salt_secret", "server.admin_token", "upstream.api_key", "telemetry.log_level"],
)  # fmt: skip
def test_operational_fields_are_live(path: str) -> None:
    """Thresholds, policy, workers, keys and secrets, log level: applied without a restart."""
    assert is_live(path)


@pytest.mark.parametrize(
    "path",
    ["server.port", "server.host", "index.kind", "loads.kind", "redis.url", "routing.hasher",
     "routing.vnodes", "discovery.name", "upstream.connect_timeout_s", "telemetry.label_limit"],
)  # fmt: skip
def test_structural_fields_need_a_restart(path: str) -> None:
    """Ports, backends, hashing and ring shape, discovery, pools: only at the next start."""
    assert not is_live(path)


def test_every_live_name_is_a_real_field() -> None:
    """The LIVE table names only fields that exist (a typo would silently need a restart)."""
    for section, names in LIVE.items():
        assert section in Settings.model_fields
        if names is None:
            continue
        model = Settings.model_fields[section].annotation
        assert isinstance(model, type)
        assert issubclass(model, BaseModel)
        assert names <= set(model.model_fields), section


def test_with_live_fields_takes_only_the_live_paths() -> None:
    """The combined settings have the new live values and the running restart-only ones."""
    running = _settings(server={"port": 9000})
    new = _settings(server={"port": 9100, "decision_headers": False}, routing={"vnodes": 64})
    paths = changed_fields(running, new)
    assert paths == ["server.port", "server.decision_headers", "routing.vnodes"]
    combined = with_live_fields(running, new, [p for p in paths if is_live(p)])
    assert combined.server.decision_headers is False
    assert combined.server.port == 9000
    assert combined.routing.vnodes == 128
