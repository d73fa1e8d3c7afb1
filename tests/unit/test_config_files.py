"""Several settings files (a ConfigMap's and a Secret's), merged in order; file errors that
never quote the file's content."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import ConfigError, load_settings


def test_later_files_override_earlier_ones(tmp_path: Path) -> None:
    """A second file adds and overrides fields of the first, section by section."""
    base = tmp_path / "router.yaml"
    base.write_text("server: {port: 9000}\nrouting: {load_factor: 1.5, min_match_blocks: 4}\n")
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(
        "routing: {load_factor: 2.0}\n"
        "tenants: {salt_secret: from-secret, api_keys: [{tenant: acme, key: sk-1}]}\n"
    )
    settings = load_settings([base, secrets], env={})
    assert settings.server.port == 9000
    assert settings.routing.load_factor == 2.0
    assert settings.routing.min_match_blocks == 4
    assert [k.tenant for k in settings.tenants.api_keys] == ["acme"]
    assert load_settings([], env={}).server.port == 8080


def test_a_yaml_error_names_the_place_but_not_the_content(tmp_path: Path) -> None:
    """A broken file's error gives line and column, never the line itself (it may be a key)."""
    broken = tmp_path / "secrets.yaml"
    broken.write_text('tenants:\n  salt_secret: "very-secret-value\n  api_keys: [\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(broken, env={})
    message = str(caught.value)
    assert "very-secret-value" not in message
    assert "line" in message
    assert str(broken) in message
