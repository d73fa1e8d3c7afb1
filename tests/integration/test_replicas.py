"""Several router replicas: one shared view through Redis, against replicas that share less.

The same seeded trace of synthetic tenants runs four times against the same simulated workers
(caches reset in between), a client spreading requests round robin over the replicas as an
ingress would:

- one replica (the reference);
- three replicas sharing Redis, both the warm index and the in-flight counts;
- three replicas with separate memory indexes (in-flight counts still shared);
- three replicas sharing nothing.

The workload is chat-shaped: short system prompts and conversations that grow turn by turn, so
most cached tokens are conversation history, and where a conversation lives depends on load
(the least loaded of `affinity_choices` ring workers, spills past the cap). A replica that did
not route a conversation's earlier turn can only find it through a shared index.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import httpx
import pytest

from load_tests.client import RunOptions, run_trace
from load_tests.redis_server import RedisServer
from load_tests.workload import WorkloadConfig, generate_trace
from tests.integration.conftest import RouterFactory, RunningRouter, SimFactory, settings_for

ONE = "one replica"
SHARED = "three replicas, shared Redis"
SEPARATE_INDEX = "three, separate memory indexes"
NOTHING_SHARED = "three, nothing shared"


class SpreadTransport(httpx.AsyncBaseTransport):
    """Sends each request to the next replica in turn (an ingress doing round robin)."""

    def __init__(self, urls: list[str]) -> None:
        self._targets = itertools.cycle([httpx.URL(u) for u in urls])
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        target = next(self._targets)
        request.url = request.url.copy_with(host=target.host, port=target.port)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def _run(routers: list[RunningRouter], config: WorkloadConfig) -> dict[str, Any]:
    trace = generate_trace(config)
    transport = SpreadTransport([r.url for r in routers])
    result = await run_trace(
        trace.requests,
        routers[0].url,
        label="replicas",
        options=RunOptions(concurrency=32, progress=False),
        transport=transport,
    )
    ok = [r for r in result.records if r.ok]
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    per_worker = Counter(r.worker for r in ok)
    reasons = Counter(r.decision.reason for r in ok if r.decision is not None)
    return {
        "requests": len(result.records),
        "ok": len(ok),
        "ratio": cached / max(prompt, 1),
        "busiest_over_mean": max(per_worker.values()) * len(per_worker) / max(len(ok), 1),
        "reasons": dict(reasons),
    }


@pytest.mark.slow
async def test_shared_redis_keeps_the_hit_rate_of_one_replica(
    sims: SimFactory, router: RouterFactory, redis_server: RedisServer
) -> None:
    """Three replicas sharing Redis keep one replica's cached-token ratio (within 2 %), while
    three replicas with separate memory indexes fall clearly below it."""
    workers = sims(4, cache_blocks=4096)
    config = WorkloadConfig(
        seed=11,
        tenants=24,
        rate=60.0,
        duration=6.0,
        head_tokens=(150, 300),
        burst_every=0,
        version_every=0,
        continue_probability=0.85,
        open_conversations=2,
        completions_fraction=0.0,
    )
    trace = generate_trace(config)
    keys = {"api_keys": [{"key": k, "tenant": t} for t, k in trace.tenants.items()]}
    # Generous: the three replicas share this test's event loop on a busy 2-core machine,
    # and a call past the production timeout (0.25 s) falls back to the ring, which is
    # the outage path (tested elsewhere), not the hit rate measured here.
    redis = {"url": redis_server.url, "op_timeout_s": 2.0}
    layouts: dict[str, list[dict[str, Any]]] = {
        ONE: [{}],
        SHARED: [{"index": {"kind": "redis"}, "loads": {"kind": "redis"}, "redis": redis}] * 3,
        SEPARATE_INDEX: [{"loads": {"kind": "redis"}, "redis": redis}] * 3,
        NOTHING_SHARED: [{}] * 3,
    }
    figures: dict[str, dict[str, Any]] = {}
    for name, replicas in layouts.items():
        async with httpx.AsyncClient(timeout=5) as client:
            for sim in workers:
                (await client.post(sim.url + "/sim/reset")).raise_for_status()
        running = [await router(settings_for(workers, tenants=keys, **extra)) for extra in replicas]
        figures[name] = await _run(running, config)
        for replica in running:
            await replica.server.close()
    print()
    for name, f in figures.items():
        print(
            f"{name:30} cached-token ratio {f['ratio']:.3f}, busiest worker "
            f"{f['busiest_over_mean']:.2f}x mean, {f['ok']}/{f['requests']} ok, {f['reasons']}"
        )
    assert all(f["ok"] == f["requests"] for f in figures.values()), figures
    one = figures[ONE]["ratio"]
    assert figures[SHARED]["ratio"] >= 0.98 * one, figures
    # Measured 7-9 points below one replica: turns routed by a replica that did not see the
    # conversation's earlier turns miss its history.
    assert figures[SEPARATE_INDEX]["ratio"] <= one - 0.04, figures
