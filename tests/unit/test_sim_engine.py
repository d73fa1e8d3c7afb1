"""The simulated engine's queueing and timing make TTFT depend on cache hits and load."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from worker.sim.cache import PrefixCache
from worker.sim.config import SimConfig
from worker.sim.engine import Engine, SimRequest
from worker.sim.hashing import BlockHasher
from worker.sim.metrics import SimMetrics

PREFILL_US = 1000.0  # 1 ms per uncached token: big enough to see, small enough to be quick
DECODE_MS = 1.0


def make(cache_blocks: int = 64, max_running: int = 8) -> tuple[Engine, PrefixCache, SimMetrics]:
    config = SimConfig(
        worker_id="w",
        cache_blocks=cache_blocks,
        block_size=4,
        prefill_us_per_token=PREFILL_US,
        decode_ms_per_token=DECODE_MS,
        max_running=max_running,
    )
    cache = PrefixCache(config.cache_blocks, BlockHasher(config.block_size, config.hash_seed))
    metrics = SimMetrics(config)
    return Engine(config, cache, metrics), cache, metrics


async def drain(
    engine: Engine, request: SimRequest, interval: float = 0.0
) -> list[tuple[float, int]]:
    """Run a request to the end, recording (time, tokens so far) at every yield."""
    loop = asyncio.get_running_loop()
    seen: list[tuple[float, int]] = []
    async with aclosing(engine.run(request, interval=interval)) as tokens:
        async for produced in tokens:
            seen.append((loop.time(), produced))
    return seen


def prefill_time(request: SimRequest) -> float:
    assert request.admitted_at is not None
    return request.first_token_at - request.admitted_at


async def test_a_cache_hit_shortens_prefill_by_the_cached_tokens() -> None:
    """The second request with the same 40-token prefix prefills 1 token instead of 41."""
    engine, _, _ = make()
    prompt = list(range(40))
    first = engine.new_request("a", [*prompt, 1000], 2, None)
    await drain(engine, first)
    second = engine.new_request("b", [*prompt, 2000], 2, None)
    await drain(engine, second)
    assert (first.cached_tokens, second.cached_tokens) == (0, 40)
    assert prefill_time(first) == pytest.approx((DECODE_MS + 41 * PREFILL_US / 1000) / 1000)
    assert prefill_time(second) == pytest.approx((DECODE_MS + 1 * PREFILL_US / 1000) / 1000)


async def test_concurrent_prefills_queue_on_the_single_lane() -> None:
    """Two uncached requests arriving together: the second's first token waits for the first's."""
    engine, _, _ = make()
    first = engine.new_request("a", list(range(30)), 2, None)
    second = engine.new_request("b", list(range(100, 120)), 2, None)
    await asyncio.gather(drain(engine, first), drain(engine, second))
    own_prefill = (DECODE_MS + 20 * PREFILL_US / 1000) / 1000
    assert second.first_token_at == pytest.approx(first.first_token_at + own_prefill, abs=1e-3)


async def test_requests_wait_fifo_when_the_batch_is_full() -> None:
    """With max_running=1 the second request is admitted only after the first finishes."""
    engine, _, _ = make(max_running=1)
    first = engine.new_request("a", [1, 2, 3], 5, None)
    second = engine.new_request("b", [4, 5, 6], 5, None)
    first_task = asyncio.create_task(drain(engine, first))
    second_task = asyncio.create_task(drain(engine, second))
    await asyncio.wait_for(first.admitted, 1)
    await asyncio.sleep(0)
    assert (engine.num_running, engine.num_waiting) == (1, 1)
    await asyncio.gather(first_task, second_task)
    assert first.finished_at is not None
    assert second.admitted_at is not None
    assert second.admitted_at >= first.finished_at


async def test_requests_wait_when_the_cache_is_full() -> None:
    """A request that cannot get blocks waits until a running one frees them."""
    engine, cache, _ = make(cache_blocks=4)
    first = engine.new_request("a", list(range(12)), 3, None)
    second = engine.new_request("b", list(range(50, 62)), 3, None)
    tasks = [asyncio.create_task(drain(engine, r)) for r in (first, second)]
    await asyncio.wait_for(first.admitted, 1)
    await asyncio.sleep(0)
    assert engine.num_waiting == 1
    await asyncio.gather(*tasks)
    assert second.admitted_at is not None
    assert first.finished_at is not None
    assert second.admitted_at >= first.finished_at
    assert cache.num_used == 0


async def test_tokens_arrive_as_decode_time_passes() -> None:
    """The first yield comes about one prefill after arrival, the last ~max_tokens decodes later."""
    engine, _, _ = make()
    request = engine.new_request("a", [1, 2, 3, 4, 5], 60, None)
    seen = await drain(engine, request, interval=0.005)
    counts = [n for _, n in seen]
    assert counts[0] == 1
    assert counts[-1] == 60
    assert counts == sorted(set(counts))
    assert len(seen) > 3  # several writes, not one burst at the end
    assert seen[-1][0] - seen[0][0] >= 59 * DECODE_MS / 1000 * 0.9


async def test_an_abandoned_request_frees_its_blocks_and_slot() -> None:
    """Closing the token stream early aborts the request: no running request, no used block."""
    engine, cache, metrics = make()
    request = engine.new_request("a", list(range(20)), 200, None)
    async with aclosing(engine.run(request, interval=0.0)) as tokens:
        async for produced in tokens:
            if produced >= 3:
                break
    assert request.finish_reason == "abort"
    assert (engine.num_running, cache.num_used, cache.num_reserved) == (0, 0, 0)
    text = metrics.render(engine, cache).decode()
    assert (
        'vllm:request_success_total{engine="0",finished_reason="abort",model_name="sim-model"} 0.0'
        in text
    )


async def test_metrics_count_prompt_cached_and_generated_tokens() -> None:
    """Queries count prompt tokens, hits count cached tokens, generation counts outputs."""
    engine, cache, metrics = make()
    prompt = list(range(17))
    await drain(engine, engine.new_request("a", prompt, 3, None))
    await drain(engine, engine.new_request("b", prompt, 3, None))
    text = metrics.render(engine, cache).decode()
    labels = '{engine="0",model_name="sim-model"}'
    assert f"vllm:prefix_cache_queries_total{labels} 34.0" in text
    assert f"vllm:prefix_cache_hits_total{labels} 16.0" in text
    assert f"vllm:generation_tokens_total{labels} 6.0" in text
    assert f"vllm:prompt_tokens_total{labels} 34.0" in text
    assert f"vllm:time_to_first_token_seconds_count{labels} 2.0" in text
    assert 'finished_reason="length"' in text
    assert 'num_gpu_blocks="64"' in text
    assert 'block_size="4"' in text
    metrics.reset()
    assert f"vllm:prefix_cache_queries_total{labels} 0.0" in metrics.render(engine, cache).decode()
