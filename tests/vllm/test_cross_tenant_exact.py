"""One tenant cannot learn whether another sent a prefix: precise mode on real vLLM.

The session's two vLLM CPU workers (tests/vllm/cluster.py), its Redis, one KV-event sidecar
per worker and a router replica in exact mode (``routing.hasher: vllm``), with two tenants.
Tenant A's prefix is made warm for A on *both* workers (through the router, and straight to
the other worker with A's salt), and the shared index confirms it from vLLM's own KV events.
Then tenant B sends the same text and variations (another tail, A's salt in ``cache_salt``,
A's name in a tenant header): vLLM reports 0 cached tokens for B wherever it lands, and the
router's decision header shows ``matched=0; best=0`` (B's chain differs from block 0 on, as
the salt enters block 0's hash). A's own repeat still hits, so A's blocks were there all along.

Time to first token is not compared here: on CPU vLLM with a tiny model, prefill of a few
hundred tokens costs little next to scheduling and HTTP noise, so a timing assertion would
be either flaky or vacuous. The simulator's test (tests/security/test_cross_tenant.py) makes
that comparison, with a cost model where a hit is clearly faster.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from aiohttp import test_utils

from load_tests.redis_server import RedisServer
from router.app import create_app
from router.config import Settings
from router.core.model import BlockHash, WorkerId
from router.errors import IndexUnavailable
from router.parse import parse_request
from router.state import STATE, RouterState
from tests.vllm.cluster import MODEL_NAME, KvSidecar, VllmCluster, start_sidecar
from tests.vllm.conftest import TIER_TIMEOUT_S

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(TIER_TIMEOUT_S),
    pytest.mark.asyncio(loop_scope="module"),
]

KEYS = {"tenant-a": "sk-xt-a", "tenant-b": "sk-xt-b"}
SYSTEM = (
    "You are the support desk of a regional railway. Trains leave every twenty minutes; "
    "season tickets are renewed online or at the station; lost property is kept for thirty "
    "days at the central office; bicycles travel free outside rush hours; delays over one "
    "hour are refunded in full on request, with the ticket number and the date of travel."
)
VARIATIONS: tuple[tuple[str, dict[str, Any], dict[str, str]], ...] = (
    ("exact text", {}, {}),
    ("another tail", {"tail": "And what about dogs?"}, {}),
    ("A's salt in cache_salt", {"salt": "A"}, {}),
    ("A's name in a tenant header", {}, {"x-tenant-id": "tenant-a"}),
)


def chat_body(tag: str, question: str = "When is the next train?", **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL_NAME,
        "messages": [
            {"role": "system", "content": f"[{tag}] {SYSTEM}"},
            {"role": "user", "content": question},
        ],
        "max_tokens": 1,
        "temperature": 0,
        **extra,
    }


@pytest.fixture(scope="module")
def sidecars(
    vllm_cluster: VllmCluster, vllm_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[KvSidecar]]:
    log_dir = tmp_path_factory.mktemp("xt-sidecars")
    running: list[KvSidecar] = []
    try:
        for worker in vllm_cluster.workers:
            running.append(start_sidecar(worker, vllm_redis.url, log_dir))
        yield running
    finally:
        for sidecar in running:
            sidecar.stop()


@pytest.fixture(scope="module")
def settings(vllm_cluster: VllmCluster, vllm_redis: RedisServer) -> Settings:
    return Settings.model_validate(
        {
            **vllm_cluster.router_settings(vllm_redis.url),
            "tenants": {
                "api_keys": [{"tenant": t, "key": k} for t, k in KEYS.items()],
                "salt_secret": "cross-tenant-exact-secret",
            },
            "health": {"probe_interval_s": 0.5, "scrape_interval_s": 0},
            "telemetry": {"access_log": False},
        }
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(
    settings: Settings, sidecars: list[KvSidecar]
) -> AsyncIterator[tuple[str, RouterState]]:
    app = create_app(settings)
    server = test_utils.TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), app[STATE]
    finally:
        await server.close()


async def send(
    url: str, tenant: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[str, dict[str, str], int]:
    """(worker, decision fields, cached tokens) of one request through the router."""
    async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
        resp = await client.post(
            url + "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {KEYS[tenant]}", **(headers or {})},
        )
    assert resp.status_code == 200, resp.text
    reason, *fields = resp.headers["x-prefix-router-decision"].split("; ")
    decision = dict(f.split("=", 1) for f in fields) | {"reason": reason}
    cached = resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    return resp.headers["x-prefix-router-worker"], decision, int(cached or 0)


async def chain_of(state: RouterState, tenant: str, body: dict[str, Any]) -> list[BlockHash]:
    parsed = parse_request("chat", json.dumps(body).encode())
    request = await state.router.plan(parsed, tenant, state.tenants.cache_salt(tenant))
    return list(request.chain)


async def indexed_everywhere(
    state: RouterState, chain: list[BlockHash], workers: list[str]
) -> None:
    """Wait until the shared index (fed by vLLM's KV events) credits every worker with it."""
    deadline = time.monotonic() + 30
    while True:
        try:
            depths = await state.index.lookup(chain)
        except IndexUnavailable:  # Redis slow on a busy machine: ask again
            depths = {}
        if all(depths.get(WorkerId(w), 0) == len(chain) for w in workers):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"A's prefix not indexed on every worker: {depths}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(("name", "change", "headers"), VARIATIONS, ids=[v[0] for v in VARIATIONS])
async def test_tenant_b_gets_no_hit_and_no_warm_decision_for_a_prefix(
    served: tuple[str, RouterState],
    vllm_cluster: VllmCluster,
    name: str,
    change: dict[str, Any],
    headers: dict[str, str],
) -> None:
    """With A's prefix cached on both vLLM workers, B's identical text (or a variation) gets
    0 cached tokens from vLLM and a decision header with no warm block anywhere."""
    url, state = served
    tag = f"xt-{name.replace(' ', '-')}"
    a_body = chat_body(tag)
    a_chain = await chain_of(state, "tenant-a", a_body)
    assert len(a_chain) >= 3

    first_worker, _, cached = await send(url, "tenant-a", a_body)
    assert cached == 0
    salt_a = state.tenants.cache_salt("tenant-a")
    async with httpx.AsyncClient(timeout=120, trust_env=False) as direct:
        for worker in vllm_cluster.workers:
            if worker.worker_id != first_worker:
                resp = await direct.post(
                    worker.url + "/v1/chat/completions", json={**a_body, "cache_salt": salt_a}
                )
                assert resp.status_code == 200, resp.text
    await indexed_everywhere(state, a_chain, [w.worker_id for w in vllm_cluster.workers])

    extra = {"cache_salt": salt_a} if change.get("salt") == "A" else {}
    b_body = chat_body(tag, change.get("tail", "When is the next train?"), **extra)
    b_chain = await chain_of(state, "tenant-b", b_body)
    assert b_chain[0] != a_chain[0], "the salt enters block 0: B's chain is B's own"

    worker, decision, cached = await send(url, "tenant-b", b_body, headers)
    assert cached == 0, (name, worker)
    assert (decision["matched"], decision["best"]) == ("0", "0"), decision
    assert decision["reason"] != "warm"

    # A's blocks were on that worker all along: A's own repeat is a warm hit.
    _, a_decision, a_cached = await send(url, "tenant-a", a_body)
    assert a_cached >= (len(a_chain) - 1) * state.settings.exact.block_size
    assert a_decision["reason"] == "warm"
