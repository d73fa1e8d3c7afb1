"""DNS discovery: workers join and leave as the name's addresses change, in-flight streams on
a departing worker finish, and a failed or empty resolution keeps the workers there are.

The resolver is injected (a plain async function returning loopback addresses), so the name
can change its answer mid-test; every simulated worker listens on its own 127.0.0.x address
and the same port, as the pods behind a headless Service do.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import httpx

from router.core.model import WorkerId
from tests.integration.conftest import (
    RouterFactory,
    RunningRouter,
    Sim,
    SimFactory,
    apoll,
    chat_body,
    metric_value,
    settings_for,
)

NAME = "vllm.llm.svc.cluster.local"
HEAD = "You are the discovery test assistant for a bicycle repair shop. " * 12


class ChangingName:
    """A DNS name whose answer the test sets; raises or answers nothing on demand."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self.addresses: list[str] = list(addresses)
        self.error: OSError | None = None
        self.asked = 0

    async def __call__(self, name: str, port: int) -> list[str]:
        assert name == NAME
        self.asked += 1
        if self.error is not None:
            raise self.error
        return list(self.addresses)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _sims_on(sims: SimFactory, hosts: Sequence[str], port: int) -> list[Sim]:
    started: list[Sim] = []
    for host in hosts:
        started += sims(1, host=host, port=port, decode_ms_per_token=20)
    return started


def _members(running: RunningRouter) -> set[str]:
    return {w.id for w in running.state.pool.members()}


async def _metrics(running: RunningRouter) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(running.url + "/metrics")).text


async def _wait_members(running: RunningRouter, expected: set[str]) -> None:
    async def settled() -> bool:
        return _members(running) == expected

    await apoll(settled, within=10)


async def test_workers_join_and_leave_with_the_names_addresses(
    sims: SimFactory, router: RouterFactory
) -> None:
    """Addresses appearing under the name become workers, vanishing ones stop taking new
    requests, and a stream already running on a vanished worker still completes."""
    port = _free_port()
    hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    _sims_on(sims, hosts, port)
    ids = [f"{host}:{port}" for host in hosts]
    name = ChangingName(hosts[:1])
    settings = settings_for(
        [], discovery={"kind": "dns", "name": NAME, "port": port, "interval_s": 0.05}
    )
    running = await router(settings, resolver=name)
    # The first answer is in before the router serves its first request.
    assert _members(running) == {ids[0]}

    name.addresses = hosts
    await _wait_members(running, set(ids))
    async with httpx.AsyncClient(timeout=30) as client:
        body = chat_body(HEAD, "the chain skips", max_tokens=60, stream=True)
        async with client.stream("POST", running.url + "/v1/chat/completions", json=body) as sse:
            assert sse.status_code == 200
            busy = sse.headers["x-prefix-router-worker"]
            events: list[str] = []
            async for line in sse.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line)
                if len(events) == 1:
                    # The busy worker's address disappears while its stream still runs.
                    name.addresses = [h for h, i in zip(hosts, ids, strict=True) if i != busy]
                    await _wait_members(running, set(ids) - {busy})
        assert events[-1] == "data: [DONE]"
        assert len(events) >= 60
        for _ in range(6):
            other = await client.post(
                running.url + "/v1/chat/completions", json=chat_body(HEAD, "the chain skips")
            )
            assert other.status_code == 200
            assert other.headers["x-prefix-router-worker"] != busy

    assert WorkerId(busy) not in running.state.index.stats()
    exposition = await _metrics(running)
    assert metric_value(exposition, "prefix_router_discovery_changes_total", change="added") == 3
    assert metric_value(exposition, "prefix_router_discovery_changes_total", change="removed") == 1
    assert f'worker="{busy}"' not in exposition


async def test_a_failed_or_empty_resolution_keeps_the_workers(
    sims: SimFactory, router: RouterFactory
) -> None:
    """When the name stops resolving (or resolves to nothing), routing carries on with the
    workers already known, and the failures are counted."""
    port = _free_port()
    [sim] = _sims_on(sims, ["127.0.0.1"], port)
    name = ChangingName(["127.0.0.1"])
    settings = settings_for(
        [], discovery={"kind": "dns", "name": NAME, "port": port, "interval_s": 0.05}
    )
    running = await router(settings, resolver=name)
    discovery = running.state.discovery
    assert discovery is not None

    for failure in (OSError("Name or service not known"), None):
        if failure is None:
            name.error, name.addresses = None, []
        else:
            name.error = failure
        seen = discovery.resolutions

        async def resolved_again(seen: int = seen) -> bool:
            return discovery.resolutions >= seen + 3

        await apoll(resolved_again)
        assert _members(running) == {f"127.0.0.1:{port}"}
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.post(
                running.url + "/v1/chat/completions", json=chat_body(HEAD, "flat tyre")
            )
        assert answer.status_code == 200
        assert answer.headers["x-prefix-router-worker"] == f"127.0.0.1:{sim.port}"
    exposition = await _metrics(running)
    assert metric_value(exposition, "prefix_router_discovery_resolutions_total", result="ok") >= 1
    assert (
        metric_value(exposition, "prefix_router_discovery_resolutions_total", result="error") >= 6
    )


async def test_static_workers_stay_beside_discovered_ones(
    sims: SimFactory, router: RouterFactory
) -> None:
    """Workers listed in the settings are kept when the DNS answer changes; discovery only
    removes the workers it added."""
    port = _free_port()
    [discovered] = _sims_on(sims, ["127.0.0.2"], port)
    [static] = sims(1)
    name = ChangingName(["127.0.0.2"])
    settings = settings_for(
        [static], discovery={"kind": "dns", "name": NAME, "port": port, "interval_s": 0.05}
    )
    running = await router(settings, resolver=name)
    assert _members(running) == {static.worker_id, f"127.0.0.2:{port}"}
    name.addresses = ["127.0.0.3"]  # nobody listens there: a pod that is not up yet
    await _wait_members(running, {static.worker_id, f"127.0.0.3:{port}"})
    assert discovered.process.alive()
