"""Secrets stay secret: API keys are held only as digests, and no key, token, salt secret or
per-tenant salt shows up in the router's log or metrics, even on failures."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import yaml

from load_tests.procs import console_script, start
from router.config import TenantSettings
from router.tenants import TenantResolver
from tests.integration.conftest import chat_body, sim_argv
from tests.security.test_limits import _admin_url

KEYS = {"alpha": "sk-alpha-s3cret-key-1234", "beta": "sk-beta-s3cret-key-5678"}
ADMIN_TOKEN = "admin-s3cret-token-9999"
SALT_SECRET = "salt-s3cret-value-4242"


def _values(obj: object, seen: set[int]) -> list[str]:
    """Every string reachable from ``obj``'s attributes and containers."""
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, bytes):
        return [obj.decode(errors="replace")]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for x in (k, v) for s in _values(x, seen)]
    if isinstance(obj, list | tuple | set | frozenset):
        return [s for x in obj for s in _values(x, seen)]
    if hasattr(obj, "__dict__"):
        return _values(vars(obj), seen)
    return []


def test_api_keys_are_held_only_as_digests() -> None:
    """The tenant resolver keeps SHA-256 digests of the keys, never a key itself."""
    settings = TenantSettings.model_validate(
        {
            "api_keys": [{"tenant": t, "key": k} for t, k in KEYS.items()],
            "salt_secret": SALT_SECRET,
        }
    )
    resolver = TenantResolver(settings)
    held = " ".join(_values(resolver, set()))
    for key in KEYS.values():
        assert key not in held
        assert hashlib.sha256(key.encode()).hexdigest() in held
    assert resolver.resolve({"Authorization": f"Bearer {KEYS['beta']}"}) == "beta"


def test_no_secret_in_logs_or_metrics(tmp_path: Path) -> None:
    """After good and failed traffic, the log and /metrics hold no key, token or salt."""
    sim = start("sim-secrets", sim_argv("w0"), log_path=tmp_path / "sim.log")
    config = {
        "server": {"port": 0, "admin_token": ADMIN_TOKEN, "admin_port": 0},
        "workers": [{"id": "w0", "url": sim.url}],
        "tenants": {
            "api_keys": [{"tenant": t, "key": k} for t, k in KEYS.items()],
            "salt_secret": SALT_SECRET,
        },
        "telemetry": {"access_log": True, "log_level": "debug"},
    }
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "router.log"
    argv = [*console_script("prefix-router"), "serve", "--config", str(path)]
    router = start("router-secrets", argv, log_path=log_path)
    try:
        admin = _admin_url(log_path)
        good = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with httpx.Client(timeout=10) as client:
            for key in KEYS.values():
                ok = client.post(
                    router.url + "/v1/chat/completions",
                    json=chat_body("secrets", "q", cache_salt="client-chosen"),
                    headers={"Authorization": f"Bearer {key}"},
                )
                assert ok.status_code == 200
            wrong = client.post(
                router.url + "/v1/chat/completions",
                json=chat_body("secrets", "q"),
                headers={"Authorization": f"Bearer {KEYS['alpha']}x"},
            )
            assert wrong.status_code == 401
            no = {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"}
            assert client.get(admin + "/admin/workers", headers=no).status_code == 401
            assert client.get(admin + "/admin/config", headers=good).status_code == 200
            # A broken settings file on reload: refused, and its error must not echo secrets.
            broken = {**config, "tenants": {**config["tenants"], "default_tenant": ["x"]}}
            path.write_text(yaml.safe_dump(broken))
            reload = client.post(admin + "/admin/reload", headers=good)
            assert reload.status_code == 400
            answers = reload.text + client.get(admin + "/admin/config", headers=good).text
            metrics = client.get(router.url + "/metrics").text
            seen = client.get(sim.url + "/sim/requests").json()
            records = seen["requests"] if isinstance(seen, dict) else seen
            salts = {record["cache_salt"] for record in records}
    finally:
        router.stop()
        sim.stop()
    assert len(salts) == 2
    assert "client-chosen" not in salts
    log = log_path.read_text(errors="replace")
    assert "incorrect API key" in log or "401" in log  # the failures were logged
    secrets = [*KEYS.values(), ADMIN_TOKEN, SALT_SECRET, *salts]
    for secret in secrets:
        assert secret not in log, secret
        assert secret not in metrics, secret
        assert secret not in answers, secret
