"""Warm-index lookup latency for a long prompt: memory index vs Redis index, real round trips.

    python -m load_tests.bench_index [--redis-url URL] [--workers 64] [--prompt-tokens 4096]
                                     [--lookups 3000] --out reports/bench/index.json

Without ``--redis-url`` it starts its own ``redis-server`` (Debian's package) on a free
loopback port in a temporary directory, so it runs from a clean clone. The index is populated
the way a busy cluster fills it: many tenants, each with a stable head (system prompt, tools)
and conversations growing behind it, recorded on the one to three workers that served them,
some confirmed and some only predicted. The looked-up prompts belong to a hot tenant whose head
is warm on several workers and whose conversations are warm to different depths on a few, so
the lookup narrows among candidates and scans a full chain. Prompts use the approximate hasher
(64 characters per block, about 4 characters per token: a 4096-token prompt is 256 blocks).

Printed and written as JSON: p50/p90/p99/max per index, in microseconds, measured around the
awaited ``lookup`` (hashing excluded, Redis round trip included). This is a benchmark, not a
test: the figures depend on the machine and its load (recorded in the JSON as ``loadavg``).
Goal (DESIGN 12): Redis p99 under 1 ms on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from load_tests.redis_server import RedisServer
from router.core.blocks import ApproxHasher, scope_key
from router.core.model import BlockHash, WorkerId
from router.index import WarmIndex
from router.index.memory import MemoryWarmIndex
from router.index.redis import RedisWarmIndex

CHARS_PER_TOKEN = 4
BLOCK_CHARS = 64
WORDS = (
    "the of and to in is that for it as with was on be by this are from or an at which have "
    "not can all but one has more been were they if will would there their what about so out "
    "function tool schema returns string integer array object required description example "
    "user assistant system answer question context document retrieve search summarize"
).split()


@dataclass(frozen=True)
class BenchConfig:
    workers: int = 64
    prompt_tokens: int = 4096
    lookups: int = 3000
    warmup: int = 300
    tenants: int = 300
    conversations: int = 8
    hot_conversations: int = 16
    head_workers: int = 6
    """Workers holding the hot tenant's head: the candidates a lookup narrows among."""
    capacity_blocks: int = 100_000
    unconfirmed: float = 0.05
    """Share of background chains that stay predicted only."""
    seed: int = 7


def _text(rng: random.Random, chars: int) -> str:
    """Word salad of exactly ``chars`` characters."""
    words: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words).ljust(chars)[:chars]


def _percentiles(samples_ns: Sequence[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0

    return {
        "p50_us": at(0.50),
        "p90_us": at(0.90),
        "p99_us": at(0.99),
        "max_us": ordered[-1] / 1000.0,
        "mean_us": sum(ordered) / len(ordered) / 1000.0,
        "n": len(ordered),
    }


@dataclass
class Workload:
    background: list[tuple[WorkerId, tuple[BlockHash, ...], str]]
    hot: list[tuple[WorkerId, tuple[BlockHash, ...], str]]
    queries: list[tuple[BlockHash, ...]]
    misses: list[tuple[BlockHash, ...]]
    """Prompts of a tenant nobody has seen: the lookup finds no candidate."""


def build_workload(config: BenchConfig) -> Workload:
    """Chains to record (background tenants, then the hot tenant) and the chains to look up."""
    rng = random.Random(config.seed)
    hasher = ApproxHasher(BLOCK_CHARS)
    workers = [WorkerId(f"w{i:02d}") for i in range(config.workers)]
    prompt_chars = config.prompt_tokens * CHARS_PER_TOKEN
    background: list[tuple[WorkerId, tuple[BlockHash, ...], str]] = []
    for tenant in range(config.tenants):
        scope = scope_key(f"tenant-{tenant}", "model")
        head = _text(rng, rng.randrange(prompt_chars // 8, prompt_chars // 2))
        homes = rng.sample(workers, rng.randint(1, 3))
        for _ in range(config.conversations):
            tail = _text(rng, rng.randrange(0, prompt_chars // 2))
            chain = hasher.chain(scope, head + tail)
            worker = rng.choice(homes)
            # As the router does: predicted when routed, confirmed when the answer came back;
            # a few stay predicted (in flight, or failed before the worker computed them).
            background.append((worker, chain, "predicted"))
            if rng.random() > config.unconfirmed:
                background.append((worker, chain, "confirmed"))
    # The hot tenant: head (half the prompt) warm on several workers; each conversation warm
    # in full on one worker, and to a shorter depth on one or two others.
    scope = scope_key("hot-tenant", "model")
    head = _text(rng, prompt_chars // 2)
    head_homes = rng.sample(workers, config.head_workers)
    hot: list[tuple[WorkerId, tuple[BlockHash, ...], str]] = []
    queries: list[tuple[BlockHash, ...]] = []
    for _ in range(config.hot_conversations):
        chain = hasher.chain(scope, head + _text(rng, prompt_chars - len(head)))
        owners = rng.sample(head_homes, min(3, len(head_homes)))
        depths = (len(chain), len(chain) * 3 // 4, len(chain) // 2 + 3)
        sources = ("confirmed", "confirmed", "predicted")
        for owner, depth, source in zip(owners, depths, sources, strict=False):
            hot.append((owner, chain[:depth], source))
        queries.append(chain)
    for worker in head_homes:
        hot.append((worker, queries[0][: len(queries[0]) // 2], "confirmed"))
    newcomer = scope_key("new-tenant", "model")
    misses = [hasher.chain(newcomer, _text(rng, prompt_chars)) for _ in range(8)]
    return Workload(background, hot, queries, misses)


async def _populate(index: WarmIndex, workload: Workload) -> None:
    for worker, chain, source in workload.background + workload.hot:
        await index.record(worker, chain, source)  # type: ignore[arg-type]


async def _time_lookups(
    index: WarmIndex, queries: Sequence[tuple[BlockHash, ...]], config: BenchConfig
) -> list[int]:
    for i in range(config.warmup):
        await index.lookup(queries[i % len(queries)])
    samples: list[int] = []
    clock = time.perf_counter_ns
    for i in range(config.lookups):
        chain = queries[i % len(queries)]
        started = clock()
        await index.lookup(chain)
        samples.append(clock() - started)
    return samples


async def _clear(index: RedisWarmIndex) -> dict[WorkerId, int]:
    """Forget every worker under the benchmark's prefix; returns what they held."""
    stats = await index.refresh_stats()
    for worker in stats:
        await index.clear(worker)
    return stats


async def _server_us_per_call(admin: aioredis.Redis) -> float:
    """Mean time Redis spent inside EVALSHA since the last CONFIG RESETSTAT, in µs."""
    stats = await admin.info("commandstats")
    figures: dict[str, float] = stats.get("cmdstat_evalsha", {})
    return float(figures.get("usec_per_call", 0.0))


async def run_bench(config: BenchConfig, redis_url: str) -> dict[str, Any]:
    workload = build_workload(config)
    records = len(workload.background) + len(workload.hot)
    results: dict[str, Any] = {}
    memory = MemoryWarmIndex(config.capacity_blocks, predicted_ttl_s=3600.0)
    await _populate(memory, workload)
    sample_answer = await memory.lookup(workload.queries[0])
    results["memory"] = _percentiles(await _time_lookups(memory, workload.queries, config))
    results["memory_miss"] = _percentiles(await _time_lookups(memory, workload.misses, config))
    redis_index = RedisWarmIndex(
        redis_url,
        prefix="bench-index",
        capacity_blocks=config.capacity_blocks,
        predicted_ttl_s=3600.0,
        op_timeout_s=1.0,
    )
    admin = aioredis.Redis.from_url(redis_url)
    await redis_index.start()
    try:
        if not redis_index.available:
            raise SystemExit(f"cannot reach Redis at {redis_url}")
        server = await admin.info("server")
        await _clear(redis_index)  # a previous run's leftovers, on a shared Redis
        started = time.perf_counter()
        await _populate(redis_index, workload)
        populate_s = time.perf_counter() - started
        # Exactness before speed: every timed prompt gets the memory index's answer.
        for chain in workload.queries + workload.misses:
            if await redis_index.lookup(chain) != await memory.lookup(chain):
                raise SystemExit("the Redis index disagrees with the memory index")
        stats = await redis_index.refresh_stats()
        for name, queries in (("redis", workload.queries), ("redis_miss", workload.misses)):
            await admin.config_resetstat()
            results[name] = _percentiles(await _time_lookups(redis_index, queries, config))
            results[name]["server_us_per_lookup"] = await _server_us_per_call(admin)
        results["redis"]["populate_records_per_s"] = round(records / populate_s)
        await _clear(redis_index)
    finally:
        await redis_index.close()
        await admin.aclose()
    return {
        "config": asdict(config),
        "block_chars": BLOCK_CHARS,
        "lookup_blocks": max(len(chain) for chain in workload.queries),
        "sample_lookup": dict(sorted(sample_answer.items())),
        "workers_with_blocks": len(stats),
        "blocks_per_worker_mean": round(sum(stats.values()) / max(1, len(stats))),
        "records": records,
        "results": results,
        "goal": {"redis_p99_us": 1000.0, "met": results["redis"]["p99_us"] < 1000.0},
        "machine": {
            "python": sys.version.split()[0],
            "redis_server": server.get("redis_version"),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        },
    }


@contextlib.contextmanager
def local_redis() -> Iterator[str]:
    """A throwaway redis-server on a free loopback port, no persistence; yields its URL."""
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as workdir:
        server = RedisServer(Path(workdir))
        try:
            server.start()
        except RuntimeError as exc:
            raise SystemExit(f"{exc}; or pass --redis-url") from None
        try:
            yield server.url
        finally:
            server.stop()


def _print(report: dict[str, Any]) -> None:
    print(
        f"lookup of a {report['config']['prompt_tokens']}-token prompt "
        f"({report['lookup_blocks']} blocks) over {report['config']['workers']} workers, "
        f"{report['records']} chains recorded, ~{report['blocks_per_worker_mean']} blocks/worker"
    )
    print(f"sample answer: {report['sample_lookup']}")
    for name, figures in report["results"].items():
        server = figures.get("server_us_per_lookup")
        inside = f"   (in Redis {server:6.1f} us)" if server is not None else ""
        print(
            f"  {name:11s} p50 {figures['p50_us']:8.1f} us   p90 {figures['p90_us']:8.1f} us   "
            f"p99 {figures['p99_us']:8.1f} us   max {figures['max_us']:8.1f} us{inside}"
        )
    goal = report["goal"]
    print(f"goal: Redis p99 < {goal['redis_p99_us']:.0f} us: {'met' if goal['met'] else 'MISSED'}")
    print(f"load average during the run: {report['machine']['loadavg']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.bench_index", description=__doc__)
    parser.add_argument("--redis-url", help="an existing Redis (default: start redis-server)")
    parser.add_argument("--workers", type=int, default=BenchConfig.workers)
    parser.add_argument("--prompt-tokens", type=int, default=BenchConfig.prompt_tokens)
    parser.add_argument("--lookups", type=int, default=BenchConfig.lookups)
    parser.add_argument("--tenants", type=int, default=BenchConfig.tenants)
    parser.add_argument(
        "--head-workers",
        type=int,
        default=BenchConfig.head_workers,
        help="workers holding the looked-up prompt's head (lookup candidates)",
    )
    parser.add_argument("--seed", type=int, default=BenchConfig.seed)
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's own loop")
    parser.add_argument("--out", type=Path, default=Path("reports/bench/index.json"))
    args = parser.parse_args(argv)
    config = BenchConfig(
        workers=args.workers,
        prompt_tokens=args.prompt_tokens,
        lookups=args.lookups,
        tenants=args.tenants,
        head_workers=max(1, args.head_workers),
        seed=args.seed,
    )
    with contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(local_redis())
        report = _run(run_bench(config, url), uvloop_on=not args.no_uvloop)
    report["event_loop"] = "asyncio" if args.no_uvloop else "uvloop"
    report["redis_url"] = "(started by the benchmark)" if not args.redis_url else args.redis_url
    _print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


def _run(coro: Any, *, uvloop_on: bool) -> dict[str, Any]:
    """Run on uvloop, as `prefix-router serve` does, unless asked not to (or not installed)."""
    try:
        import uvloop
    except ImportError:
        uvloop_on = False
    result: dict[str, Any] = uvloop.run(coro) if uvloop_on else asyncio.run(coro)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
