"""Settings reload through the admin API: live fields change at once, restart-only fields are
reported and keep their running values, invalid settings change nothing."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import yaml

from router.config import load_settings
from tests.integration.conftest import (
    ADMIN_TOKEN,
    RouterFactory,
    RunningRouter,
    Sim,
    SimFactory,
    chat_body,
    metric_value,
    settings_for,
)

HEAD = "You are the reload test assistant for a ferry timetable service. " * 10


def _config(sims: list[Sim], **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "server": {"admin_token": ADMIN_TOKEN, "admin_on_public_port": True},
        "workers": [{"id": s.worker_id, "url": s.url} for s in sims],
        "tenants": {"salt_secret": "reload-secret", "api_keys": [{"tenant": "t", "key": "k1"}]},
        "telemetry": {"access_log": False},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return data


async def _start(router: RouterFactory, path: Path, data: dict[str, Any]) -> RunningRouter:
    path.write_text(yaml.safe_dump(data))
    return await router(
        load_settings(path, env={}), settings_loader=lambda: load_settings(path, env={})
    )


async def _reload(running: RunningRouter) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(running.url + "/admin/reload", headers=running.admin_headers())


async def _chat(running: RunningRouter, key: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(
            running.url + "/v1/chat/completions", json=chat_body(HEAD, "next sailing?"),
            headers={"Authorization": f"Bearer {key}"},
        )  # fmt: skip


async def test_a_reload_applies_live_fields_and_reports_restart_ones(
    sims: SimFactory, router: RouterFactory, tmp_path: Path
) -> None:
    """Keys, workers, policy and thresholds change at once; vnodes and the index size are
    reported as needing a restart and keep their running values."""
    first, second = sims(2)
    path = tmp_path / "router.yaml"
    running = await _start(router, path, _config([first]))
    assert (await _chat(running, "k1")).status_code == 200

    path.write_text(yaml.safe_dump(_config(
        [second],
        tenants={"api_keys": [{"tenant": "t", "key": "k2"}]},
        routing={"policy": "least_loaded", "load_factor": 1.5, "vnodes": 64},
        index={"capacity_blocks": 777},
    )))  # fmt: skip
    answer = await _reload(running)
    assert answer.status_code == 200
    result = answer.json()
    assert result["result"] == "applied"
    assert set(result["applied"]) == {
        "workers", "tenants.api_keys", "routing.policy", "routing.load_factor",
    }  # fmt: skip
    assert set(result["restart_required"]) == {"routing.vnodes", "index.capacity_blocks"}

    assert (await _chat(running, "k1")).status_code == 401
    served = await _chat(running, "k2")
    assert served.status_code == 200
    assert served.headers["x-prefix-router-worker"] == second.worker_id
    assert "policy=least_loaded" in served.headers["x-prefix-router-decision"]
    state = running.state
    assert [w.id for w in state.pool.members()] == [second.worker_id]
    assert state.tuning.current.load_factor == 1.5
    assert state.settings.routing.vnodes == 128
    assert state.settings.index.capacity_blocks == 100_000
    async with httpx.AsyncClient(timeout=10) as client:
        config = (await client.get(running.url + "/admin/config",
                                   headers=running.admin_headers())).json()  # fmt: skip
        metrics = (await client.get(running.url + "/metrics")).text
    assert config["last_reload"]["restart_required"] == result["restart_required"]
    assert config["settings"]["routing"]["policy"] == "least_loaded"
    assert metric_value(metrics, "prefix_router_reloads_total", source="admin", result="applied")
    assert metric_value(metrics, "prefix_router_reload_restart_required") == 1


async def test_an_invalid_file_is_rejected_and_nothing_changes(
    sims: SimFactory, router: RouterFactory, tmp_path: Path
) -> None:
    """A reload of settings that do not validate answers 400, counts a rejection, and the
    router keeps serving with the settings it had."""
    [sim] = sims(1)
    path = tmp_path / "router.yaml"
    running = await _start(router, path, _config([sim]))
    bad = _config([sim], tenants={"api_keys": [{"tenant": "t", "key": "k2"}]})
    bad["routing"] = {"min_match_ratio": 7}
    path.write_text(yaml.safe_dump(bad))
    answer = await _reload(running)
    assert answer.status_code == 400
    assert "routing.min_match_ratio" in answer.json()["error"]["message"]
    assert (await _chat(running, "k1")).status_code == 200
    assert (await _chat(running, "k2")).status_code == 401
    path.write_text("workers: [not a mapping\n")
    assert (await _reload(running)).status_code == 400
    async with httpx.AsyncClient(timeout=10) as client:
        metrics = (await client.get(running.url + "/metrics")).text
    assert metric_value(metrics, "prefix_router_reloads_total", result="rejected") == 2


async def test_a_reload_for_another_reason_keeps_live_tuning(
    sims: SimFactory, router: RouterFactory, tmp_path: Path
) -> None:
    """A threshold set through PUT /admin/config survives a reload whose file did not change
    that threshold; an unchanged file reloads as 'unchanged'."""
    [sim] = sims(1)
    path = tmp_path / "router.yaml"
    running = await _start(router, path, _config([sim]))
    async with httpx.AsyncClient(timeout=10) as client:
        put = await client.put(running.url + "/admin/config", json={"load_factor": 3.0},
                               headers=running.admin_headers())  # fmt: skip
    assert put.status_code == 200
    assert (await _reload(running)).json()["result"] == "unchanged"
    path.write_text(yaml.safe_dump(_config([sim], telemetry={"log_level": "warning"})))
    logger = logging.getLogger("prefix_router")
    level = logger.level
    try:
        assert (await _reload(running)).json()["applied"] == ["telemetry.log_level"]
        assert logger.level == logging.WARNING
    finally:
        logger.setLevel(level)  # logging is process-wide; later tests expect it untouched
    assert running.state.tuning.current.load_factor == 3.0


async def test_reload_needs_a_settings_source(sims: SimFactory, router: RouterFactory) -> None:
    """A router built from a Settings value alone says there is nothing to reload from."""
    [sim] = sims(1)
    running = await router(settings_for([sim]))
    answer = await _reload(running)
    assert answer.status_code == 400
    assert "without a settings source" in answer.json()["error"]["message"]
