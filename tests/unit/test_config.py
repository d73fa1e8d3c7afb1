"""Settings: file, then environment, then CLI overrides; errors that name the field; secrets kept
out of every rendering; live tuning that swaps whole validated values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from router.config import (
    ConfigError,
    RoutingSettings,
    Settings,
    TuningState,
    WorkerSpec,
    load_settings,
)
from router.core.model import Tuning

CONFIG_YAML = """
server:
  port: 9000
routing:
  load_factor: 1.1
  min_match_blocks: 3
workers:
  - url: http://file-a:8000
  - url: http://file-b:8000
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "router.yaml"
    path.write_text(CONFIG_YAML)
    return path


def test_defaults_without_any_source() -> None:
    """With no file, env or flags the router starts with the documented defaults."""
    settings = load_settings(env={})
    assert settings.server.port == 8080
    assert settings.routing.policy == "cache_aware"
    assert settings.routing.load_factor == 1.25
    assert settings.workers == ()
    assert settings.routing.tuning() == Tuning()


def test_file_values_are_loaded(config_file: Path) -> None:
    """Values in the config file replace the defaults; untouched fields keep theirs."""
    settings = load_settings(config_file, env={})
    assert settings.server.port == 9000
    assert settings.routing.load_factor == 1.1
    assert settings.routing.min_match_blocks == 3
    assert settings.routing.affinity_blocks == 8
    assert [w.worker_id for w in settings.workers] == ["file-a:8000", "file-b:8000"]


def test_env_overrides_file(config_file: Path) -> None:
    """PREFIX_ROUTER_<SECTION>__<FIELD> beats the file, typed by the field."""
    env = {
        "PREFIX_ROUTER_ROUTING__LOAD_FACTOR": "1.5",
        "PREFIX_ROUTER_TENANTS__TRUST_TENANT_HEADER": "true",
        "PREFIX_ROUTER_WORKERS": "http://a:1, http://b:2,",
    }
    settings = load_settings(config_file, env=env)
    assert settings.routing.load_factor == 1.5
    assert settings.routing.min_match_blocks == 3  # the file's value survives
    assert settings.server.port == 9000
    assert settings.tenants.trust_tenant_header is True
    assert [w.url for w in settings.workers] == ["http://a:1", "http://b:2"]


def test_overrides_beat_env_and_file(config_file: Path) -> None:
    """CLI flags (overrides) win over both the environment and the file."""
    env = {"PREFIX_ROUTER_ROUTING__LOAD_FACTOR": "1.5", "PREFIX_ROUTER_SERVER__PORT": "9100"}
    overrides: dict[str, Any] = {
        "routing": {"load_factor": 2.0},
        "workers": [{"url": "http://cli:1"}],
    }
    settings = load_settings(config_file, env=env, overrides=overrides)
    assert settings.routing.load_factor == 2.0
    assert settings.server.port == 9100
    assert settings.routing.min_match_blocks == 3
    assert [w.worker_id for w in settings.workers] == ["cli:1"]


def test_env_layer_ignores_unrelated_variables() -> None:
    """Variables without the router's prefix are not read."""
    settings = load_settings(env={"PATH": "/bin", "ROUTING__LOAD_FACTOR": "9"})
    assert settings.routing.load_factor == 1.25


def test_env_secret_that_looks_like_a_number_stays_a_string() -> None:
    """A secret such as 0777, yes or 123456 in the environment is used exactly as written."""
    for raw in ("0777", "yes", "123456", "2024-01-01", "null"):
        settings = load_settings(env={"PREFIX_ROUTER_TENANTS__SALT_SECRET": raw})
        assert settings.tenants.salt_secret is not None
        assert settings.tenants.salt_secret.get_secret_value() == raw


def test_env_numbers_and_booleans_are_converted_by_field_type() -> None:
    """Numeric and boolean fields accept the usual spellings from the environment."""
    env = {
        "PREFIX_ROUTER_ROUTING__LOAD_FACTOR": "2",
        "PREFIX_ROUTER_ROUTING__MIN_MATCH_BLOCKS": "4",
        "PREFIX_ROUTER_SERVER__DECISION_HEADERS": "off",
        "PREFIX_ROUTER_INDEX__PREDICTED_TTL_S": "1e1",
    }
    settings = load_settings(env=env)
    assert settings.routing.load_factor == 2.0
    assert settings.routing.min_match_blocks == 4
    assert settings.server.decision_headers is False
    assert settings.index.predicted_ttl_s == 10.0


def test_env_structured_values_are_parsed_as_yaml() -> None:
    """A list or mapping in an env var (e.g. API keys) is read as YAML."""
    env = {"PREFIX_ROUTER_TENANTS__API_KEYS": "[{tenant: acme, key: sk-1}]"}
    settings = load_settings(env=env)
    assert [k.tenant for k in settings.tenants.api_keys] == ["acme"]


def test_kubernetes_service_link_variables_do_not_stop_startup() -> None:
    """The variables Kubernetes injects for a Service named prefix-router are ignored."""
    env = {
        "PREFIX_ROUTER_SERVICE_HOST": "10.96.0.10",
        "PREFIX_ROUTER_SERVICE_PORT": "8080",
        "PREFIX_ROUTER_SERVICE_PORT_HTTP": "8080",
        "PREFIX_ROUTER_PORT": "tcp://10.96.0.10:8080",
        "PREFIX_ROUTER_PORT_8080_TCP": "tcp://10.96.0.10:8080",
        "PREFIX_ROUTER_PORT_8080_TCP_ADDR": "10.96.0.10",
        "PREFIX_ROUTER_PORT_8080_TCP_PORT": "8080",
        "PREFIX_ROUTER_PORT_8080_TCP_PROTO": "tcp",
        "PREFIX_ROUTER_ADMIN_SERVICE_HOST": "10.96.0.11",
        "PREFIX_ROUTER_ROUTING__LOAD_FACTOR": "1.5",
    }
    settings = load_settings(env=env)
    assert settings.server.port == 8080
    assert settings.routing.load_factor == 1.5


def test_malformed_env_name_is_an_error_naming_it() -> None:
    """An env var under the prefix without SECTION__FIELD is refused, not silently dropped."""
    with pytest.raises(ConfigError, match="PREFIX_ROUTER_LOAD_FACTOR"):
        load_settings(env={"PREFIX_ROUTER_LOAD_FACTOR": "1.5"})


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"PREFIX_ROUTER_ROUTING__LOAD_FACTOR": "0.5"}, "routing.load_factor"),
        ({"PREFIX_ROUTER_ROUTING__LOAD_FACTOR": "fast"}, "routing.load_factor"),
        ({"PREFIX_ROUTER_SERVER__PORT": "70000"}, "server.port"),
        ({"PREFIX_ROUTER_ROUTING__POLICY": "random"}, "routing.policy"),
        ({"PREFIX_ROUTER_ROUTING__NO_SUCH_FIELD": "1"}, "routing.no_such_field"),
        ({"PREFIX_ROUTER_NOSECTION__FIELD": "1"}, "nosection"),
        ({"PREFIX_ROUTER_WORKERS": "ftp://x:1"}, "workers.0.url"),
        ({"PREFIX_ROUTER_WORKERS": "not-a-url"}, "workers.0.url"),
    ],
)
def test_invalid_values_name_the_field(env: dict[str, str], field: str) -> None:
    """An invalid setting fails with a ConfigError that names the offending field."""
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_settings(env=env)


def test_unreadable_or_malformed_file_is_a_config_error(tmp_path: Path) -> None:
    """A missing file, broken YAML or a non-mapping top level is a ConfigError naming the file."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_settings(missing, env={})
    broken = tmp_path / "broken.yaml"
    broken.write_text("routing: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_settings(broken, env={})
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(listing, env={})


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    """An empty config file is allowed and changes nothing."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_settings(empty, env={}) == Settings()


def test_duplicate_worker_ids_are_rejected() -> None:
    """Two workers with the same id (explicit or host:port) cannot both be configured."""
    with pytest.raises(ConfigError, match="duplicate worker id 'h:1'"):
        load_settings(
            env={}, overrides={"workers": [{"url": "http://h:1"}, {"url": "http://h:1/"}]}
        )
    with pytest.raises(ConfigError, match="duplicate worker id 'w'"):
        load_settings(
            env={},
            overrides={
                "workers": [{"url": "http://a:1", "id": "w"}, {"url": "http://b:1", "id": "w"}]
            },
        )


def test_worker_id_defaults_to_host_and_port() -> None:
    """A worker without an id is named host:port, with the scheme's default port if none."""
    assert WorkerSpec(url="http://10.0.0.5:8000/").worker_id == "10.0.0.5:8000"
    assert WorkerSpec(url="http://gpu-0").worker_id == "gpu-0:80"
    assert WorkerSpec(url="https://gpu-0").worker_id == "gpu-0:443"
    assert WorkerSpec(url="http://gpu-0:8000", id="gpu-0").worker_id == "gpu-0"
    assert WorkerSpec(url="http://gpu-0:8000/").url == "http://gpu-0:8000"


SECRETS = ("admin-token-s3cret", "salt-s3cret-value", "upstream-key-s3cret", "sk-client-s3cret")


def _secret_settings() -> Settings:
    return load_settings(
        env={},
        overrides={
            "server": {"admin_token": SECRETS[0]},
            "tenants": {
                "salt_secret": SECRETS[1],
                "api_keys": [{"tenant": "acme", "key": SECRETS[3]}],
            },
            "upstream": {"api_key": SECRETS[2]},
        },
    )


def test_secrets_never_appear_in_repr_or_dumps() -> None:
    """repr, str and JSON dumps of the settings show no secret in clear."""
    settings = _secret_settings()
    renderings = [
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        json.dumps(settings.model_dump(mode="json")),
    ]
    for text in renderings:
        for secret in SECRETS:
            assert secret not in text
    # The values are still there for the components that need them.
    assert settings.server.admin_token is not None
    assert settings.server.admin_token.get_secret_value() == SECRETS[0]


def test_secrets_never_appear_in_config_errors() -> None:
    """A config error caused by a section holding secrets does not print those secrets."""
    overrides: dict[str, Any] = {
        "tenants": {
            "salt_secret": SECRETS[1],
            "api_keys": [{"tenant": "a", "key": SECRETS[3], "key_sha256": "0" * 64}],
        },
    }
    with pytest.raises(ConfigError) as excinfo:
        load_settings(env={}, overrides=overrides)
    assert "tenants.api_keys.0" in str(excinfo.value)
    assert SECRETS[3] not in str(excinfo.value)
    # A model-wide error (duplicate workers) must not echo the whole input either.
    overrides = {
        "tenants": {"salt_secret": SECRETS[1]},
        "server": {"admin_token": SECRETS[0]},
        "workers": [{"url": "http://h:1"}, {"url": "http://h:1"}],
    }
    with pytest.raises(ConfigError) as excinfo:
        load_settings(env={}, overrides=overrides)
    assert "duplicate worker id" in str(excinfo.value)
    for secret in SECRETS:
        assert secret not in str(excinfo.value)
    # A secret of the wrong type is not echoed back either.
    with pytest.raises(ConfigError) as excinfo:
        load_settings(env={}, overrides={"tenants": {"salt_secret": 987654321}})
    assert "tenants.salt_secret" in str(excinfo.value)
    assert "987654321" not in str(excinfo.value)


def test_api_key_needs_exactly_one_form() -> None:
    """An API key entry gives the key in clear or as a valid hex sha256, not both or neither."""
    cases: list[dict[str, Any]] = [
        {"tenant": "a"},
        {"tenant": "a", "key": "k", "key_sha256": "0" * 64},
        {"tenant": "a", "key_sha256": "xyz"},
        {"tenant": "a", "key_sha256": "g" * 64},
    ]
    for entry in cases:
        with pytest.raises(ConfigError, match="tenant 'a'"):
            load_settings(env={}, overrides={"tenants": {"api_keys": [entry]}})


def test_one_key_for_two_tenants_is_rejected() -> None:
    """The same API key configured for two tenants is refused (it would pick one silently)."""
    digest = "a" * 64
    api_keys = [
        {"tenant": "acme", "key_sha256": digest},
        {"tenant": "globex", "key_sha256": digest.upper()},
    ]
    with pytest.raises(ConfigError, match="'acme' and 'globex'"):
        load_settings(env={}, overrides={"tenants": {"api_keys": api_keys}})


def test_settings_are_frozen() -> None:
    """Loaded settings cannot be changed in place by a component."""
    settings = load_settings(env={})
    with pytest.raises(ValueError):
        settings.routing.load_factor = 3.0


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"PREFIX_ROUTER_SERVER__ADMIN_TOKEN": ""}, "server.admin_token"),
        ({"PREFIX_ROUTER_TENANTS__SALT_SECRET": ""}, "tenants.salt_secret"),
    ],
)
def test_empty_admin_token_or_salt_secret_is_refused(env: dict[str, str], field: str) -> None:
    """An empty admin token (anyone could send it) or empty salt secret fails to load."""
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_settings(env=env)


# TuningState --------------------------------------------------------------------------------


def test_tuning_update_applies_a_partial_change() -> None:
    """A partial update changes the named fields and keeps the others."""
    state = TuningState(RoutingSettings().tuning())
    result = state.update({"load_factor": 1.5, "min_match_blocks": 4})
    assert result == state.current
    assert state.current == Tuning(load_factor=1.5, min_match_blocks=4)


def test_tuning_update_coerces_numbers_to_the_declared_type() -> None:
    """Integral floats become ints for int fields; ints become floats for float fields."""
    state = TuningState(Tuning())
    state.update({"min_match_blocks": 3.0, "load_factor": 2, "min_match_ratio": 1})
    current = state.current
    assert current.min_match_blocks == 3
    assert type(current.min_match_blocks) is int
    assert type(current.load_factor) is float
    assert type(current.min_match_ratio) is float


def test_tuning_update_accepts_floats_even_if_started_from_an_int() -> None:
    """A float field set from an int at startup still takes fractional updates."""
    state = TuningState(Tuning(load_factor=2))
    assert state.update({"load_factor": 1.5}).load_factor == 1.5


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"load_factor": 0.5}, "load_factor"),
        ({"load_factor": True}, "load_factor must be a number"),
        ({"min_match_blocks": False}, "min_match_blocks must be a number"),
        ({"min_match_blocks": 2.5}, "min_match_blocks must be an integer"),
        ({"min_match_blocks": 0}, "min_match_blocks"),
        ({"affinity_blocks": "8"}, "affinity_blocks must be a number"),
        ({"min_match_ratio": 1.5}, "min_match_ratio"),
        ({"load_factor": float("inf")}, "load_factor must be a finite number"),
        ({"load_factor": float("nan")}, "load_factor must be a finite number"),
        ({"load_factor": 10**400}, "load_factor must be a finite number"),
        ({"load_factor": None}, "load_factor must be a number"),
        ({"no_such": 1}, "unknown tuning fields"),
    ],
)
def test_invalid_tuning_update_is_refused_and_changes_nothing(
    changes: dict[str, Any], message: str
) -> None:
    """A bad update raises ValueError naming the field, and the old tuning stays in force."""
    state = TuningState(Tuning(load_factor=1.3, min_match_blocks=3))
    before = state.current
    with pytest.raises(ValueError, match=message):
        state.update(changes)
    assert state.current is before


def test_tuning_update_is_all_or_nothing() -> None:
    """When one field of an update is bad, the valid ones are not applied either."""
    state = TuningState(Tuning())
    with pytest.raises(ValueError, match="min_match_ratio"):
        state.update({"load_factor": 3.0, "min_match_ratio": 2.0})
    assert state.current == Tuning()
    with pytest.raises(ValueError, match="unknown"):
        state.update({"load_factor": 3.0, "bogus": 1})
    assert state.current == Tuning()
