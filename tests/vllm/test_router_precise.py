"""Precise mode on real vLLM: the router's chains, the shared index and vLLM's cache agree.

The two vLLM CPU workers of the session (tests/vllm/cluster.py), one real Redis, one
``prefix-worker kv-events`` sidecar per worker (real processes on the workers' ``ipc://``
endpoints) and router replicas served in-process in exact mode (``routing.hasher: vllm``),
sharing the Redis warm index and load board, with two salted tenants. Through the router:

1. the chain the router computes is exactly the block hashes vLLM stores for the request;
2. a fresh replica, which can only know from Redis, routes a repeated prefix warm, vLLM
   serves it from cache there, and another tenant's identical text gets no hit;
3. blocks vLLM evicts leave the index;
4. a restarted worker's stale entries leave the index before it is routed to again.

Wall time: about 50 s on top of the tier, 40 of them the restarted vLLM's startup.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from aiohttp import test_utils

from load_tests.redis_server import RedisServer
from router.app import create_app
from router.config import Settings
from router.core.model import BlockHash, WorkerId
from router.parse import Endpoint, parse_request
from router.state import STATE, RouterState
from tests.vllm.cluster import (
    MODEL_NAME,
    KvBatch,
    KvEventFeed,
    KvSidecar,
    VllmCluster,
    VllmWorker,
    start_again,
    start_sidecar,
    stop_worker,
    stored_events,
    stored_hashes,
)
from tests.vllm.conftest import TIER_TIMEOUT_S

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(TIER_TIMEOUT_S),
    pytest.mark.asyncio(loop_scope="module"),
]

ADMIN_TOKEN = "precise-admin-token"
API_KEYS = {"acme": "key-acme", "globex": "key-globex"}
PATHS: dict[Endpoint, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
SYSTEM = (
    "You are a careful assistant for a logistics company. Answer in one short sentence. "
    "Shipments leave the warehouse every morning; delayed parcels are re-routed through the "
    "nearest hub, and customers are told by email. Refunds take five working days."
)
FIRST = "Where is my parcel?"
SECOND = "How long do refunds take?"
FLOOD_TOKENS = 1888
"""59 blocks of 32 per flooding prompt: under the workers' 2048-token context."""
MAX_FLOODS = 24
"""The 16 MiB cache holds 512 blocks: about nine floods push anything out; more means a bug."""


@dataclass(frozen=True, slots=True)
class Routed:
    """What the router answered for one request: where it went, why, and vLLM's usage."""

    worker: str
    reason: str
    matched_blocks: int
    prompt_tokens: int
    cached_tokens: int


@dataclass
class Replica:
    """A router replica served on 127.0.0.1 (port 0), and a client for it."""

    url: str
    state: RouterState
    client: httpx.AsyncClient

    async def send(self, endpoint: Endpoint, tenant: str, body: dict[str, Any]) -> Routed:
        response = await self.client.post(
            self.url + PATHS[endpoint],
            json=body,
            headers={"Authorization": f"Bearer {API_KEYS[tenant]}"},
        )
        assert response.status_code == 200, response.text
        reason, *fields = response.headers["x-prefix-router-decision"].split("; ")
        matched = dict(field.split("=", 1) for field in fields)["matched"]
        usage = response.json()["usage"]
        return Routed(
            response.headers["x-prefix-router-worker"],
            reason,
            int(matched),
            usage["prompt_tokens"],
            usage["prompt_tokens_details"]["cached_tokens"],
        )

    async def plan(
        self, endpoint: Endpoint, tenant: str, body: dict[str, Any]
    ) -> tuple[tuple[BlockHash, ...], str | None]:
        """The chain the router computes for ``body`` from ``tenant`` (with the salt it
        forwards), and the worker owning its affinity key on the ring."""
        parsed = parse_request(endpoint, json.dumps(body).encode())
        salt = self.state.tenants.cache_salt(tenant)
        request = await self.state.router.plan(parsed, tenant, salt)
        key = request.affinity_key
        return request.chain, None if key is None else self.state.pool.ring.owner(key)

    async def depth(self, worker: str, chain: tuple[BlockHash, ...]) -> int:
        """Leading blocks of ``chain`` the shared index credits ``worker`` with."""
        return (await self.state.index.lookup(chain)).get(WorkerId(worker), 0)


@asynccontextmanager
async def serve_replica(settings: Settings) -> AsyncIterator[Replica]:
    """A new router replica (its own pool, index client and load board) for a ``with`` block."""
    app = create_app(settings)
    server = test_utils.TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with httpx.AsyncClient(timeout=120) as client:
            yield Replica(str(server.make_url("")).rstrip("/"), app[STATE], client)
    finally:
        await server.close()


async def until(check: Callable[[], Awaitable[bool]], what: str, within: float = 20.0) -> None:
    """Poll ``check`` until it holds; fail saying ``what`` did not happen in ``within`` s."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within:.0f}s")
        await asyncio.sleep(0.05)


async def first_tag(stem: str, fits: Callable[[str], Awaitable[bool]]) -> str:
    """The first of ``stem-0``, ``stem-1``, ... that ``fits`` (deterministic: the ring and
    the hashes are)."""
    for attempt in range(64):
        if await fits(tag := f"{stem}-{attempt}"):
            return tag
    raise AssertionError(f"no {stem}-N tag fits")


def chat_body(tag: str, question: str = FIRST) -> dict[str, Any]:
    """A chat request whose prefix no other test sends (``tag`` leads the system prompt)."""
    return {
        "model": MODEL_NAME,
        "messages": [
            {"role": "system", "content": f"[{tag}] {SYSTEM}"},
            {"role": "user", "content": question},
        ],
        "max_tokens": 1,
        "temperature": 0,
    }


def completion_body(tag: str) -> dict[str, Any]:
    return {
        "model": MODEL_NAME,
        "prompt": f"[{tag}] {SYSTEM} Customer: my parcel is late. Agent:",
        "max_tokens": 1,
        "temperature": 0,
    }


def removed_hashes(batches: list[KvBatch]) -> set[int]:
    return {
        h for b in batches for e in b.events if e.get("type") == "BlockRemoved"
        for h in e["block_hashes"]
    }  # fmt: skip


def worker_named(cluster: VllmCluster, worker_id: str) -> VllmWorker:
    return next(w for w in cluster.workers if w.worker_id == worker_id)


@pytest.fixture(scope="module")
def sidecars(
    vllm_cluster: VllmCluster, vllm_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, KvSidecar]]:
    """One KV-event sidecar per worker, feeding the shared index in Redis."""
    log_dir = tmp_path_factory.mktemp("sidecars")
    running: dict[str, KvSidecar] = {}
    try:
        for worker in vllm_cluster.workers:
            running[worker.worker_id] = start_sidecar(worker, vllm_redis.url, log_dir)
        yield running
    finally:
        for sidecar in running.values():
            sidecar.stop()


@pytest.fixture(scope="module")
def settings(vllm_cluster: VllmCluster, vllm_redis: RedisServer) -> Settings:
    """Precise mode: vLLM's hashes, the workers' tokenizer and block size, Redis shared."""
    return Settings.model_validate(
        {
            **vllm_cluster.router_settings(vllm_redis.url),
            "server": {"admin_token": ADMIN_TOKEN, "admin_on_public_port": True},
            "tenants": {
                "api_keys": [{"tenant": t, "key": k} for t, k in API_KEYS.items()],
                "salt_secret": "precise-mode-test-secret",
            },
            # Quick to eject a stopped worker and to take it back once it answers again.
            "health": {
                "probe_interval_s": 0.2,
                "probe_timeout_s": 1.0,
                "eject_base_s": 0.5,
                "eject_max_s": 1.0,
                "scrape_interval_s": 0,
            },  # fmt: skip
            "telemetry": {"access_log": False},
        }
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def replica(settings: Settings, sidecars: dict[str, KvSidecar]) -> AsyncIterator[Replica]:
    """The first router replica; the sidecars are up before it serves."""
    async with serve_replica(settings) as running:
        yield running


@pytest.mark.parametrize("tenant", list(API_KEYS))
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_router_chain_is_what_vllm_stores(
    replica: Replica, kv_events: dict[str, KvEventFeed], endpoint: Endpoint, tenant: str
) -> None:
    """The chain the router hashes for a salted request is the block list vLLM stores for it."""
    tag = f"chain-{endpoint}-{tenant}"
    body = chat_body(tag) if endpoint == "chat" else completion_body(tag)
    chain, _ = await replica.plan(endpoint, tenant, body)
    assert len(chain) >= 3
    for feed in kv_events.values():
        feed.drain()

    routed = await replica.send(endpoint, tenant, body)

    feed = kv_events[routed.worker]
    batches = await asyncio.to_thread(
        feed.collect_until, lambda got: len(stored_hashes(got)) >= len(chain)
    )
    events = stored_events(batches)
    assert stored_hashes(batches) == list(chain)
    assert events[0]["parent_block_hash"] is None
    assert events[0]["extra_keys"][0] == [replica.state.tenants.cache_salt(tenant)]
    assert routed.prompt_tokens // replica.state.settings.exact.block_size == len(chain)
    (other,) = set(kv_events) - {routed.worker}
    assert stored_events(kv_events[other].drain()) == []


async def test_fresh_replica_routes_warm_from_the_shared_index(
    replica: Replica, settings: Settings
) -> None:
    """A new replica sends a tenant's repeated prefix to the worker caching it; not another's."""
    tenant, other = "acme", "globex"

    # A prefix whose ring owner is the same worker for both tenants, so the other tenant's
    # identical text lands where this tenant's blocks are cached, and must still miss.
    async def same_owner(tag: str) -> bool:
        _, owner = await replica.plan("chat", tenant, chat_body(tag, FIRST))
        _, other_owner = await replica.plan("chat", other, chat_body(tag, SECOND))
        return owner == other_owner

    tag = await first_tag("warm", same_owner)
    first_body, second_body = chat_body(tag, FIRST), chat_body(tag, SECOND)

    await until(lambda: _idle(replica), "loads settled")
    first = await replica.send("chat", tenant, first_body)
    assert (first.reason, first.cached_tokens) == ("affinity", 0)

    async with serve_replica(settings) as fresh:
        first_chain, _ = await fresh.plan("chat", tenant, first_body)
        chain, _ = await fresh.plan("chat", tenant, second_body)
        pairs = enumerate(zip(first_chain, chain, strict=False))
        shared = next((i for i, (a, b) in pairs if a != b), min(len(first_chain), len(chain)))
        assert shared >= 2
        await until(lambda: _has_depth(fresh, first.worker, chain, shared), "shared prefix")
        await until(lambda: _idle(fresh), "loads settled")

        second = await fresh.send("chat", tenant, second_body)
        assert (second.worker, second.reason) == (first.worker, "warm")
        assert second.matched_blocks == shared
        # vLLM served exactly the blocks the index credited the worker with.
        assert second.cached_tokens == shared * settings.exact.block_size

        await until(lambda: _idle(fresh), "loads settled")
        third = await fresh.send("chat", other, second_body)
        assert (third.worker, third.reason) == (first.worker, "affinity")
        assert third.cached_tokens == 0


async def test_blocks_vllm_evicts_leave_the_index(
    replica: Replica, vllm_cluster: VllmCluster, kv_events: dict[str, KvEventFeed]
) -> None:
    """When vLLM evicts a prefix's blocks, the shared index stops crediting that worker."""
    body = chat_body("evicted")
    chain, _ = await replica.plan("chat", "acme", body)
    routed = await replica.send("chat", "acme", body)
    holder = worker_named(vllm_cluster, routed.worker)
    await until(lambda: _has_depth(replica, holder.worker_id, chain, len(chain)), "prefix indexed")
    feed = kv_events[holder.worker_id]
    feed.drain()

    # Distinct prompts straight to the holder (the router would spread them) until vLLM has
    # reported every block of the prefix removed.
    rng = random.Random(1234)
    removed: set[int] = set()
    floods = 0
    blocks = FLOOD_TOKENS // vllm_cluster.block_size
    async with httpx.AsyncClient(timeout=120) as client:
        while not set(chain) <= removed and floods < MAX_FLOODS:
            floods += 1
            prompt = [rng.randrange(100, 600) for _ in range(FLOOD_TOKENS)]
            flood = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1}
            response = await client.post(holder.url + "/v1/completions", json=flood)
            assert response.status_code == 200, response.text
            # Removals are published in the same step as the stores that needed the room.
            batches = await asyncio.to_thread(
                feed.collect_until, lambda got: len(stored_hashes(got)) >= blocks
            )
            removed |= removed_hashes(batches)
    assert set(chain) <= removed, f"prefix still cached after {floods} floods"

    await until(lambda: _has_depth(replica, holder.worker_id, chain, 0), "evicted prefix unindexed")
    async with httpx.AsyncClient(timeout=30) as client:
        dry = await client.post(
            replica.url + "/admin/route?tenant=acme",
            json=body,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
    assert dry.json()["decision"]["best_available_blocks"] == 0


async def test_restarted_worker_leaves_no_stale_entries(
    replica: Replica, vllm_cluster: VllmCluster, sidecars: dict[str, KvSidecar]
) -> None:
    """A restarted worker's old blocks leave the index, and it gets requests again once up."""
    target = vllm_cluster.workers[-1]

    async def owned_by_target(tag: str) -> bool:
        return (await replica.plan("chat", "acme", chat_body(tag)))[1] == target.worker_id

    body = chat_body(await first_tag("restart", owned_by_target))
    chain, _ = await replica.plan("chat", "acme", body)
    await until(lambda: _idle(replica), "loads settled")
    before = await replica.send("chat", "acme", body)
    assert before.worker == target.worker_id
    await until(lambda: _has_depth(replica, target.worker_id, chain, len(chain)), "indexed")

    pool = replica.state.pool

    async def healthy() -> bool:
        worker = pool.get(WorkerId(target.worker_id))
        return worker is not None and worker.state == "healthy"

    async def out_of_rotation() -> bool:
        return not await healthy()

    started = time.monotonic()
    await asyncio.to_thread(stop_worker, target)
    # While it is down: the router ejects it, and the sidecar drops everything it held.
    await until(out_of_rotation, "worker ejected by the router")
    await until(lambda: _has_depth(replica, target.worker_id, chain, 0), "stale entries gone")
    await asyncio.to_thread(start_again, vllm_cluster, target)
    print(f"{target.worker_id} restarted in {time.monotonic() - started:.1f}s", flush=True)

    await until(healthy, "worker healthy in the router again")
    assert await replica.depth(target.worker_id, chain) == 0
    await until(lambda: _idle(replica), "loads settled")
    after = await replica.send("chat", "acme", body)
    # Nothing warm anywhere now: the prefix goes to its ring owner, cold.
    assert (after.worker, after.reason, after.cached_tokens) == (target.worker_id, "affinity", 0)
    await until(lambda: _has_depth(replica, target.worker_id, chain, len(chain)), "re-indexed")
    assert sidecars[target.worker_id].metric("prefix_router_kv_events_restarts_total") >= 1


async def _idle(replica: Replica) -> bool:
    """No request in flight on any worker, as this replica sees the fleet.

    Affinity goes to the less loaded of a key's first two ring workers (ties: the owner), and
    the other replica's counts reach this one up to two publish intervals late, more while
    vLLM keeps both cores busy. Tests that name the owner as the destination wait for this.
    """
    router, now = replica.state.router, time.monotonic()
    return all(router.load_of(worker, now) == 0 for worker in replica.state.pool.members())


async def _has_depth(replica: Replica, worker: str, chain: tuple[int, ...], depth: int) -> bool:
    return await replica.depth(worker, chain) == depth
