"""Precise mode end to end: a simulator publishing KV events, the sidecar as a real process, a
real Redis. The index must hold exactly the blocks the worker holds, through evictions, worker
restarts, sidecar restarts and a Redis restart."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from load_tests.procs import ServerProcess, console_script
from load_tests.redis_server import RedisServer
from router.core.model import WorkerId
from router.errors import IndexUnavailable
from router.index.redis import RedisWarmIndex
from tests.integration.sim_fixtures import start_sim

WORKER = WorkerId("w1")
FAST = ("--decode-ms-per-token", "0", "--prefill-us-per-token", "0")


async def until(check: Callable[[], Awaitable[bool]], deadline_s: float = 15.0) -> None:
    """Poll ``check`` until it is true; fail after ``deadline_s``."""
    async with asyncio.timeout(deadline_s):
        while not await check():  # noqa: ASYNC110 - the state lives in other processes
            await asyncio.sleep(0.05)


@dataclass
class Sidecar:
    """A ``prefix-worker kv-events`` process and what its "subscribed" log line said."""

    popen: subprocess.Popen[bytes]
    log: Path
    info: dict[str, Any]

    async def metric(self, name: str, **labels: str) -> float:
        async with httpx.AsyncClient() as client:
            text = (await client.get(self.info["metrics"], timeout=5)).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    total += sample.value
        return total

    def stop(self) -> int:
        """SIGTERM and wait: the exit code."""
        self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=15)

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait(timeout=15)


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=sink
        )


async def start_sidecar(
    log_dir: Path, redis: RedisServer, endpoint: str, *extra: str, name: str = "sidecar"
) -> Sidecar:
    log = log_dir / f"{name}.log"
    argv = [
        *console_script("prefix-worker"),
        *("kv-events", "--worker-id", WORKER, "--endpoint", endpoint),
        *("--redis-url", redis.url, "--metrics-host", "127.0.0.1", "--metrics-port", "0"),
        *extra,
    ]
    popen = _spawn(argv, log)
    info: dict[str, Any] = {}

    async def subscribed() -> bool:
        if popen.poll() is not None:
            raise AssertionError(f"sidecar exited with {popen.returncode}: {log.read_text()}")
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("event") == "subscribed":
                info.update(entry)
                return True
        return False

    try:
        await until(subscribed, 20)
    except BaseException:
        popen.kill()
        popen.wait(timeout=15)
        raise
    return Sidecar(popen, log, info)


@asynccontextmanager
async def warm_index(redis: RedisServer) -> AsyncIterator[RedisWarmIndex]:
    index = RedisWarmIndex(redis.url, capacity_blocks=100_000, predicted_ttl_s=60)
    await index.start()
    try:
        yield index
    finally:
        await index.close()


async def depth(index: RedisWarmIndex, hashes: list[int]) -> int:
    """How many leading blocks of ``hashes`` the index says the worker holds (-1: Redis down)."""
    try:
        return (await index.lookup(hashes)).get(WORKER, 0)
    except IndexUnavailable:
        return -1


async def complete(sim: ServerProcess, tokens: list[int]) -> list[int]:
    """Run a completion over ``tokens``; the block hashes the simulator computed for it."""
    async with httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
        answer = await client.post("/v1/completions", json={"prompt": tokens, "max_tokens": 1})
        assert answer.status_code == 200, answer.text
        (record,) = (await client.get("/sim/requests", params={"limit": 1})).json()["requests"]
    hashes: list[int] = record["block_hashes"]
    assert len(hashes) == len(tokens) // 16
    return hashes


async def batches(sidecar: Sidecar) -> float:
    return await sidecar.metric("prefix_router_kv_events_batches_total")


async def connect_events(sim: ServerProcess, sidecar: Sidecar) -> None:
    """Wait until the sidecar receives the simulator's batches (a new ZMQ subscriber misses
    what is published before its subscription arrives): reset the cache until one gets
    through."""
    async with httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
        await until(lambda: _publishers_up(sidecar))
        before = await batches(sidecar)

        async def delivered() -> bool:
            await client.post("/sim/reset")
            try:
                await until(lambda: _more(sidecar, before), 0.5)
            except TimeoutError:
                return False
            return True

        await until(delivered)


async def _publishers_up(sidecar: Sidecar) -> bool:
    return await sidecar.metric("prefix_router_kv_events_publishers") >= 1


async def _more(sidecar: Sidecar, before: float) -> bool:
    return await batches(sidecar) > before


def tokens(start: int, blocks: int) -> list[int]:
    return list(range(start, start + 16 * blocks))


async def test_stored_blocks_land_in_redis_under_the_worker(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """After a request, the index holds every block hash the simulator stored for it."""
    ipc = f"ipc://{tmp_path}/events"
    sim = start_sim(tmp_path, WORKER, *FAST, "--kv-events-endpoint", ipc)
    sidecar = await start_sidecar(tmp_path, redis_server, ipc)
    try:
        assert sidecar.info["mode"] == "connect"
        await connect_events(sim, sidecar)
        async with warm_index(redis_server) as index:
            chain = await complete(sim, tokens(1000, 6))
            await until(lambda: _depth_is(index, chain, 6))
            salted = await _complete_salted(sim, tokens(1000, 6), "tenant-a")
            assert salted != chain
            await until(lambda: _depth_is(index, salted, 6))
        stored = await sidecar.metric("prefix_router_kv_events_applied_total", type="BlockStored")
        assert stored >= 2
    finally:
        assert sidecar.stop() == 0
        sim.stop()


async def _complete_salted(sim: ServerProcess, prompt: list[int], salt: str) -> list[int]:
    async with httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
        body = {"prompt": prompt, "max_tokens": 1, "cache_salt": salt}
        assert (await client.post("/v1/completions", json=body)).status_code == 200
        (record,) = (await client.get("/sim/requests", params={"limit": 1})).json()["requests"]
    hashes: list[int] = record["block_hashes"]
    return hashes


async def _depth_is(index: RedisWarmIndex, chain: list[int], expected: int) -> bool:
    return await depth(index, chain) == expected


async def test_evicted_blocks_leave_redis(tmp_path: Path, redis_server: RedisServer) -> None:
    """Blocks the simulator evicts disappear from the index (sidecar binds, simulator connects)."""
    sidecar = await start_sidecar(tmp_path, redis_server, "tcp://127.0.0.1:0")
    endpoint = sidecar.info["endpoint"]
    assert sidecar.info["mode"] == "bind"
    assert endpoint.startswith("tcp://127.0.0.1:")
    sim = start_sim(
        tmp_path, WORKER, *FAST, "--cache-blocks", "8", "--kv-events-endpoint", endpoint
    )
    try:
        await connect_events(sim, sidecar)
        async with warm_index(redis_server) as index:
            first = await complete(sim, tokens(0, 4))
            await until(lambda: _depth_is(index, first, 4))
            # 7.5 blocks need all 8 blocks of the cache: every block of the first prompt goes.
            second = await complete(sim, tokens(5000, 7) + list(range(8)))
            await until(lambda: _depth_is(index, second, 7))
            await until(lambda: _depth_is(index, first, 0))
        removed = await sidecar.metric("prefix_router_kv_events_applied_total", type="BlockRemoved")
        assert removed >= 4
    finally:
        assert sidecar.stop() == 0
        sim.stop()


async def test_simulator_restart_clears_stale_entries(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A worker that restarts (sequence back to 0) leaves none of its old blocks in the index."""
    ipc = f"ipc://{tmp_path}/events"
    sim = start_sim(tmp_path, WORKER, *FAST, "--kv-events-endpoint", ipc)
    sidecar = await start_sidecar(tmp_path, redis_server, ipc)
    try:
        await connect_events(sim, sidecar)
        async with warm_index(redis_server) as index:
            old = await complete(sim, tokens(0, 5))
            await until(lambda: _depth_is(index, old, 5))
            sim.stop()
            await until(lambda: _publishers_down(sidecar))
            sim = start_sim(tmp_path, WORKER, *FAST, "--kv-events-endpoint", ipc)
            await until(lambda: _publishers_up(sidecar))
            await _until_one_lands(sim, index)
            assert await depth(index, old) == 0
        assert await sidecar.metric("prefix_router_kv_events_restarts_total") == 1
    finally:
        assert sidecar.stop() == 0
        sim.stop()


async def _publishers_down(sidecar: Sidecar) -> bool:
    return await sidecar.metric("prefix_router_kv_events_publishers") == 0


async def _until_one_lands(sim: ServerProcess, index: RedisWarmIndex) -> list[int]:
    """Send new prompts until one shows up in the index (the first may be missed by a
    subscriber that just (re)connected); return its chain."""
    landed: list[int] = []
    attempt = 0

    async def lands() -> bool:
        nonlocal attempt
        attempt += 1
        chain = await complete(sim, tokens(100_000 * attempt, 3))
        try:
            await until(lambda: _depth_is(index, chain, 3), 1.0)
        except TimeoutError:
            return False
        landed.extend(chain)
        return True

    await until(lands)
    return landed


async def test_sidecar_restart_replays_what_it_missed(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Events published while the sidecar was down are replayed when it comes back."""
    ipc, replay = f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/replay"
    sim = start_sim(
        tmp_path, WORKER, *FAST, "--kv-events-endpoint", ipc, "--kv-events-replay-endpoint", replay
    )
    sidecar = await start_sidecar(tmp_path, redis_server, ipc, "--replay-endpoint", replay)
    try:
        await connect_events(sim, sidecar)
        async with warm_index(redis_server) as index:
            before = await complete(sim, tokens(0, 4))
            await until(lambda: _depth_is(index, before, 4))
            sidecar.kill()
            missed = await complete(sim, tokens(7000, 5))
            sidecar = await start_sidecar(
                tmp_path, redis_server, ipc, "--replay-endpoint", replay, name="sidecar-2"
            )
            await until(lambda: _publishers_up(sidecar))
            await _until_one_lands(sim, index)
            assert await depth(index, missed) == 5
            assert await depth(index, before) == 4
        assert await sidecar.metric("prefix_router_kv_events_resyncs_total", method="replay") == 1
    finally:
        if sidecar.popen.poll() is None:
            assert sidecar.stop() == 0
        sim.stop()


async def test_sidecar_restart_without_replay_clears_the_worker(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Without a replay endpoint, missed events make the sidecar clear the worker's entries."""
    ipc = f"ipc://{tmp_path}/events"
    sim = start_sim(tmp_path, WORKER, *FAST, "--kv-events-endpoint", ipc)
    sidecar = await start_sidecar(tmp_path, redis_server, ipc)
    try:
        await connect_events(sim, sidecar)
        async with warm_index(redis_server) as index:
            before = await complete(sim, tokens(0, 4))
            await until(lambda: _depth_is(index, before, 4))
            sidecar.kill()
            missed = await complete(sim, tokens(7000, 5))
            sidecar = await start_sidecar(tmp_path, redis_server, ipc, name="sidecar-2")
            await until(lambda: _publishers_up(sidecar))
            latest = await _until_one_lands(sim, index)
            assert await depth(index, missed) == 0
            assert await depth(index, before) == 0
            assert await depth(index, latest) == 3
        assert await sidecar.metric("prefix_router_kv_events_resyncs_total", method="clear") == 1
    finally:
        if sidecar.popen.poll() is None:
            assert sidecar.stop() == 0
        sim.stop()


async def test_redis_restart_is_ridden_out(tmp_path: Path, redis_server: RedisServer) -> None:
    """Events that arrive while Redis is down are applied once it is back; the sidecar lives."""
    ipc = f"ipc://{tmp_path}/events"
    sim = start_sim(tmp_path, WORKER, *FAST, "--kv-events-endpoint", ipc)
    sidecar = await start_sidecar(tmp_path, redis_server, ipc)
    try:
        await connect_events(sim, sidecar)
        redis_server.stop()
        during = await complete(sim, tokens(3000, 4))
        await until(lambda: _redis_error_seen(sidecar))
        redis_server.start()
        async with warm_index(redis_server) as index:
            await until(lambda: _depth_is(index, during, 4))
        assert sidecar.popen.poll() is None
        assert await sidecar.metric("prefix_router_kv_events_redis_errors_total") >= 1
    finally:
        assert sidecar.stop() == 0
        sim.stop()


async def _redis_error_seen(sidecar: Sidecar) -> bool:
    return await sidecar.metric("prefix_router_kv_events_redis_errors_total") >= 1
