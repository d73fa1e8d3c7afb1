"""Live thresholds shared through Redis: ``PUT /admin/config`` on one replica changes every
replica, a replica started later takes the fleet's values, and nothing changes anywhere when
the change cannot be shared.

Replicas are in-process routers on one real redis-server, polling it every 50 ms.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import yaml

from load_tests.redis_server import RedisServer
from router.config import Settings, load_settings
from router.shared_tuning import SharedTuning
from tests.integration.conftest import (
    ADMIN_TOKEN,
    RouterFactory,
    RunningRouter,
    Sim,
    SimFactory,
    apoll,
    metric_value,
    settings_for,
)


@pytest.fixture
def sim(sims: SimFactory) -> Sim:
    [one] = sims(1)
    return one


def shared_settings(sim: Sim, redis_url: str, **routing: Any) -> Settings:
    return settings_for(
        [sim],
        loads={"kind": "redis"},
        redis={"url": redis_url, "tuning_poll_s": 0.05},
        routing=routing,
    )


async def put_config(
    running: RunningRouter, changes: dict[str, Any], scope: str | None = None
) -> httpx.Response:
    params = {} if scope is None else {"scope": scope}
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.put(
            running.url + "/admin/config",
            json=changes,
            params=params,
            headers=running.admin_headers(),
        )


async def get_config(running: RunningRouter) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.get(running.url + "/admin/config", headers=running.admin_headers())
    assert answer.status_code == 200, answer.text
    config: dict[str, Any] = answer.json()
    return config


def shared(running: RunningRouter) -> SharedTuning:
    assert running.state.shared_tuning is not None
    return running.state.shared_tuning


async def runs(running: RunningRouter, **expected: Any) -> bool:
    tuning = running.state.tuning.current
    return all(getattr(tuning, name) == value for name, value in expected.items())


async def test_a_change_on_one_replica_reaches_every_replica(
    sim: Sim, router: RouterFactory, redis_server: RedisServer
) -> None:
    """PUT on one replica answers the fleet version; the others run it within a poll, say so
    in GET /admin/config and in prefix_router_tuning_version."""
    replicas = [await router(shared_settings(sim, redis_server.url)) for _ in range(3)]
    first, *others = replicas

    put = await put_config(first, {"load_factor": 2.0, "min_match_blocks": 3})
    assert put.status_code == 200, put.text
    answer = put.json()
    assert answer["tuning"]["load_factor"] == 2.0
    assert answer["shared_tuning"] == {
        "scope": "fleet",
        "version": 1,
        "redis_reachable": True,
        "replica": shared(first).replica_id,
    }
    for replica in others:
        await apoll(lambda r=replica: runs(r, load_factor=2.0, min_match_blocks=3))

    for replica in replicas:
        config = await get_config(replica)
        assert config["tuning"]["load_factor"] == 2.0
        assert config["shared_tuning"]["version"] == 1
        async with httpx.AsyncClient(timeout=10) as client:
            metrics = (await client.get(replica.url + "/metrics")).text
        assert metric_value(metrics, "prefix_router_tuning_version") == 1
        # The dry run explains decisions with the fleet's thresholds.
        async with httpx.AsyncClient(timeout=10) as client:
            dry = await client.post(
                replica.url + "/admin/route",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                headers=replica.admin_headers(),
            )
        assert dry.json()["tuning"]["min_match_blocks"] == 3


async def test_a_replica_started_later_takes_the_fleet_values(
    sim: Sim, router: RouterFactory, redis_server: RedisServer
) -> None:
    """A scale-out replica serves its first request with the live values, not its file's."""
    first = await router(shared_settings(sim, redis_server.url))
    assert (await put_config(first, {"affinity_blocks": 4})).status_code == 200

    later = await router(shared_settings(sim, redis_server.url))
    assert later.state.tuning.current.affinity_blocks == 4
    assert shared(later).version == 1


async def test_a_replica_whose_file_changed_keeps_its_file_values_until_the_next_change(
    sim: Sim, router: RouterFactory, redis_server: RedisServer
) -> None:
    """A live change made against other file values (the file was edited since) does not
    override a starting replica's file; the next live change reaches it."""
    first = await router(shared_settings(sim, redis_server.url))
    assert (await put_config(first, {"load_factor": 2.0})).status_code == 200

    edited = await router(shared_settings(sim, redis_server.url, load_floor=8))
    assert await runs(edited, load_factor=1.25, load_floor=8)
    assert shared(edited).version == 1

    put = await put_config(edited, {"min_match_blocks": 5})
    assert put.status_code == 200, put.text
    assert put.json()["shared_tuning"]["version"] == 2
    await apoll(lambda: runs(first, load_factor=1.25, load_floor=8, min_match_blocks=5))


async def test_scope_replica_changes_one_replica_only(
    sim: Sim, router: RouterFactory, redis_server: RedisServer
) -> None:
    """?scope=replica is a canary: this replica alone, until the next fleet-wide change."""
    canary, other = [await router(shared_settings(sim, redis_server.url)) for _ in range(2)]

    put = await put_config(canary, {"load_factor": 3.0}, scope="replica")
    assert put.status_code == 200, put.text
    assert await runs(canary, load_factor=3.0)
    assert await shared(other).sync()  # a poll has happened since: nothing to take
    assert await runs(other, load_factor=1.25)
    assert shared(canary).version == shared(other).version == 0

    assert (await put_config(other, {"min_match_blocks": 4})).status_code == 200
    await apoll(lambda: runs(canary, load_factor=1.25, min_match_blocks=4))

    # A fleet change made on the canary itself carries the fleet's values, not its override.
    assert (await put_config(canary, {"load_factor": 3.0}, scope="replica")).status_code == 200
    assert (await put_config(canary, {"min_match_blocks": 5})).status_code == 200
    assert await runs(canary, load_factor=1.25, min_match_blocks=5)
    await apoll(lambda: runs(other, min_match_blocks=5))
    assert await runs(other, load_factor=1.25)


async def test_changes_made_at_once_on_two_replicas_both_land(
    sim: Sim, router: RouterFactory, redis_server: RedisServer
) -> None:
    """Two replicas changing different thresholds at the same moment: neither is lost."""
    one, two = [await router(shared_settings(sim, redis_server.url)) for _ in range(2)]

    puts = await asyncio.gather(
        put_config(one, {"load_factor": 3.0}), put_config(two, {"min_match_blocks": 6})
    )
    assert [p.status_code for p in puts] == [200, 200], [p.text for p in puts]
    assert sorted(p.json()["shared_tuning"]["version"] for p in puts) == [1, 2]
    for replica in (one, two):
        await apoll(lambda r=replica: runs(r, load_factor=3.0, min_match_blocks=6))


async def test_without_redis_a_fleet_change_is_refused_and_changes_nothing(
    sim: Sim, router: RouterFactory, redis_server: RedisServer
) -> None:
    """Redis down: 503 with an OpenAI-style error naming the cause, no replica changed; a
    replica-scoped change still works; once Redis is back, fleet changes work again."""
    first, other = [await router(shared_settings(sim, redis_server.url)) for _ in range(2)]
    redis_server.stop()

    put = await put_config(first, {"load_factor": 2.0})
    assert put.status_code == 503
    error = put.json()["error"]
    assert error["code"] == "tuning_not_shared"
    assert "nothing changed" in error["message"]
    assert await runs(first, load_factor=1.25)
    assert (await get_config(first))["shared_tuning"]["redis_reachable"] is False
    assert (await put_config(first, {"load_factor": 2.0}, scope="replica")).status_code == 200

    redis_server.start()
    put = await put_config(other, {"min_match_blocks": 7})
    assert put.status_code == 200, put.text
    await apoll(lambda: runs(first, load_factor=1.25, min_match_blocks=7))


@pytest.mark.parametrize(
    ("params", "body", "fragment"),
    [
        ({}, {"load_factor": 0.5}, "load_factor"),
        ({}, {"no_such_knob": 1}, "unknown tuning fields"),
        ({"scope": "galaxy"}, {"load_factor": 2.0}, "scope must be fleet or replica"),
    ],
)
async def test_bad_changes_are_refused_before_anything_is_shared(
    sim: Sim,
    router: RouterFactory,
    redis_server: RedisServer,
    params: dict[str, str],
    body: dict[str, Any],
    fragment: str,
) -> None:
    running = await router(shared_settings(sim, redis_server.url))
    put = await put_config(running, body, scope=params.get("scope"))
    assert put.status_code == 400
    assert fragment in put.json()["error"]["message"]
    assert shared(running).version == 0
    client = aioredis.from_url(redis_server.url)
    try:
        assert await client.exists("{pr}:tuning") == 0
    finally:
        await client.aclose()


async def test_scope_fleet_needs_redis(sim: Sim, router: RouterFactory) -> None:
    """Without Redis the thresholds are per replica: asking for the fleet is a 400 that says
    what to configure, and a plain PUT changes this replica."""
    running = await router(settings_for([sim]))
    assert running.state.shared_tuning is None
    put = await put_config(running, {"load_factor": 2.0}, scope="fleet")
    assert put.status_code == 400
    assert "redis" in put.json()["error"]["message"]
    put = await put_config(running, {"load_factor": 2.0})
    assert put.status_code == 200
    assert put.json()["shared_tuning"] == {"scope": "replica"}


async def test_a_record_from_a_newer_router_applies_the_fields_this_one_knows(
    sim: Sim, router: RouterFactory, redis_server: RedisServer
) -> None:
    """During a rolling upgrade a newer replica may write thresholds this one lacks."""
    running = await router(shared_settings(sim, redis_server.url))
    base = {
        "load_factor": 1.25, "min_match_blocks": 2, "min_match_ratio": 0.0,
        "affinity_blocks": 8, "affinity_choices": 2, "load_floor": 4,
    }  # fmt: skip
    client = aioredis.from_url(redis_server.url)
    try:
        await client.hset(
            "{pr}:tuning",
            mapping={
                "version": 1,
                "tuning": json.dumps({**base, "load_factor": 1.75, "future_knob": 9}),
                "base": json.dumps(base),
                "by": "newer-replica",
                "at": 0,
            },
        )
    finally:
        await client.aclose()
    await apoll(lambda: runs(running, load_factor=1.75))
    assert shared(running).version == 1


async def test_a_record_lost_with_a_redis_restart_starts_again(
    sim: Sim, router: RouterFactory, redis_server: RedisServer
) -> None:
    """Redis restarted without persistence loses the record: every replica keeps its values,
    and the next change (version 1 again) reaches the replicas that ran a higher version."""
    one, two = [await router(shared_settings(sim, redis_server.url)) for _ in range(2)]
    for changes in ({"load_factor": 2.0}, {"load_factor": 2.5}):
        assert (await put_config(one, changes)).status_code == 200
    await apoll(lambda: runs(two, load_factor=2.5))
    assert shared(two).version == 2

    redis_server.restart()
    await apoll(lambda: _version_is(two, 0))
    assert await runs(two, load_factor=2.5)

    put = await put_config(one, {"min_match_blocks": 3})
    assert put.status_code == 200, put.text
    assert put.json()["shared_tuning"]["version"] == 1
    await apoll(lambda: runs(two, load_factor=2.5, min_match_blocks=3))


async def _version_is(running: RunningRouter, version: int) -> bool:
    return shared(running).version == version


@pytest.mark.parametrize(
    "record",
    [{"version": 3, "tuning": "{not json", "base": "[]"}, {"version": "three", "tuning": "{}"}],
    ids=["bad-json", "bad-version"],
)
async def test_an_unreadable_record_is_ignored_and_the_next_change_replaces_it(
    sim: Sim, router: RouterFactory, redis_server: RedisServer, record: dict[str, Any]
) -> None:
    """A record damaged by hand changes nothing here, and a PUT still goes through."""
    client = aioredis.from_url(redis_server.url)
    try:
        await client.hset("{pr}:tuning", mapping=record)
    finally:
        await client.aclose()
    running = await router(shared_settings(sim, redis_server.url))
    assert await runs(running, load_factor=1.25)

    put = await put_config(running, {"load_factor": 1.5})
    assert put.status_code == 200, put.text
    assert await runs(running, load_factor=1.5)
    other = await router(shared_settings(sim, redis_server.url))
    assert await runs(other, load_factor=1.5)


async def test_a_fleet_change_keeps_what_a_reload_of_the_file_changed(
    sim: Sim, router: RouterFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Fleet values taken, then the ConfigMap edited and reloaded: the next fleet change
    carries the edited value, not the one from before the edit."""
    first = await router(shared_settings(sim, redis_server.url))
    assert (await put_config(first, {"load_factor": 2.0})).status_code == 200

    path = tmp_path / "router.yaml"
    data: dict[str, Any] = {
        "server": {"admin_token": ADMIN_TOKEN, "admin_on_public_port": True},
        "workers": [{"id": sim.worker_id, "url": sim.url}],
        "loads": {"kind": "redis"},
        "redis": {"url": redis_server.url, "tuning_poll_s": 0.05},
        "routing": {},
        "telemetry": {"access_log": False},
    }
    path.write_text(yaml.safe_dump(data))
    reloading = await router(
        load_settings(path, env={}), settings_loader=lambda: load_settings(path, env={})
    )
    assert await runs(reloading, load_factor=2.0)

    data["routing"]["load_floor"] = 8
    path.write_text(yaml.safe_dump(data))
    async with httpx.AsyncClient(timeout=10) as client:
        reload = await client.post(
            reloading.url + "/admin/reload", headers=reloading.admin_headers()
        )
    assert reload.json()["applied"] == ["routing.load_floor"]
    assert (await put_config(reloading, {"min_match_blocks": 3})).status_code == 200
    assert await runs(reloading, load_factor=2.0, load_floor=8, min_match_blocks=3)
    await apoll(lambda: runs(first, load_factor=2.0, load_floor=8, min_match_blocks=3))
