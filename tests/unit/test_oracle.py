"""The oracle bound and the hit-available/captured replay of load-test reports."""

from __future__ import annotations

import dataclasses

from load_tests.oracle import CacheGeometry, PromptBuilder, hit_shares, oracle_bound
from load_tests.records import RequestRecord
from load_tests.workload import CHAT_PATH, TraceRequest, WorkloadConfig, generate_trace

GEOMETRY = CacheGeometry(workers=2, cache_blocks=4096, block_size=16)


def _chat(index: int, tenant: str, system: str, user: str, salt: str | None = None) -> TraceRequest:
    body: dict[str, object] = {
        "model": "sim-model",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": 8,
    }
    if salt:
        body["cache_salt"] = salt
    return TraceRequest(index, float(index), tenant, f"k-{tenant}", CHAT_PATH, body, False,
                        None, 1, 0)  # fmt: skip


SYSTEM = "You are a careful assistant. " * 40  # ~1,100 bytes, ~17 blocks of 16 tokens


def test_repeated_prefix_is_cached_once_seen() -> None:
    """The second request with the same head finds the head's full blocks cached."""
    bound = oracle_bound([_chat(0, "a", SYSTEM, "one"), _chat(1, "a", SYSTEM, "two")], GEOMETRY)
    first_prompt = len(PromptBuilder(GEOMETRY).prompt(_chat(0, "a", SYSTEM, "one")).tokens)
    assert 0 < bound.pooled_cached_tokens < first_prompt
    assert bound.pooled_cached_tokens % GEOMETRY.block_size == 0
    assert bound.pooled_cached_tokens == bound.unbounded_cached_tokens


def test_tenants_never_share_blocks_even_with_identical_text() -> None:
    """Identical text from two tenants is not a hit: the bound respects tenant isolation."""
    bound = oracle_bound([_chat(0, "a", SYSTEM, "q"), _chat(1, "b", SYSTEM, "q")], GEOMETRY)
    assert bound.pooled_cached_tokens == 0


def test_a_client_salt_scopes_like_a_tenant() -> None:
    """Two tenants' requests with the same explicit salt share; different salts do not."""
    same = [_chat(0, "a", SYSTEM, "q", salt="s"), _chat(1, "b", SYSTEM, "q", salt="s")]
    other = [_chat(0, "a", SYSTEM, "q", salt="s"), _chat(1, "a", SYSTEM, "q", salt="t")]
    assert oracle_bound(same, GEOMETRY).pooled_cached_tokens > 0
    assert oracle_bound(other, GEOMETRY).pooled_cached_tokens == 0


def test_pooled_bound_never_exceeds_unbounded_and_grows_with_the_cache() -> None:
    """On a real trace: pooled <= unbounded, and a larger cluster cache never lowers it."""
    trace = generate_trace(WorkloadConfig(seed=3, tenants=12, head_tokens=(300, 700),
                                          rate=20, duration=6))  # fmt: skip
    small = oracle_bound(trace.requests, dataclasses.replace(GEOMETRY, cache_blocks=64))
    large = oracle_bound(trace.requests, dataclasses.replace(GEOMETRY, cache_blocks=4096))
    assert small.pooled_cached_tokens <= large.pooled_cached_tokens
    assert large.pooled_cached_tokens <= large.unbounded_cached_tokens
    assert small.pooled_cached_tokens < small.unbounded_cached_tokens  # eviction happened
    assert large.prompt_tokens == small.prompt_tokens > 0


def _record(request: TraceRequest, worker: str, started: float) -> RequestRecord:
    return RequestRecord(index=request.index, tenant=request.tenant, path=request.path,
                         stream=False, started=started, finished=started + 0.1, status=200,
                         worker=worker)  # fmt: skip


def test_hit_shares_separate_warm_somewhere_from_warm_where_it_went() -> None:
    """Sending a repeat to a cold worker shows as available but not captured."""
    requests = [_chat(0, "a", SYSTEM, "one"), _chat(1, "a", SYSTEM, "two")]
    scattered = [_record(requests[0], "w0", 0.0), _record(requests[1], "w1", 1.0)]
    together = [_record(requests[0], "w0", 0.0), _record(requests[1], "w0", 1.0)]
    apart = hit_shares(requests, scattered, GEOMETRY)
    same = hit_shares(requests, together, GEOMETRY)
    assert apart.available_tokens == same.available_tokens > 0
    assert apart.captured_tokens == 0
    assert same.captured_tokens == same.available_tokens
    assert apart.prompt_tokens == same.prompt_tokens


def test_hit_shares_skip_requests_that_reached_no_worker() -> None:
    """Failed requests count nowhere (they reached no cache)."""
    requests = [_chat(0, "a", SYSTEM, "one"), _chat(1, "a", SYSTEM, "two")]
    failed = _record(requests[1], "w0", 1.0)
    failed.status, failed.error = 0, "timeout"
    shares = hit_shares(requests, [_record(requests[0], "w0", 0.0), failed], GEOMETRY)
    assert shares.requests == 1
    assert shares.captured_tokens == 0


def test_no_assignment_of_requests_to_workers_beats_the_oracle() -> None:
    """Whatever worker each request goes to, per-worker LRU caches stay under the bound."""
    import random

    trace = generate_trace(WorkloadConfig(seed=5, tenants=10, head_tokens=(300, 700),
                                          rate=25, duration=6))  # fmt: skip
    geometry = dataclasses.replace(GEOMETRY, workers=3, cache_blocks=96)  # heavy eviction
    builder = PromptBuilder(geometry)
    bound = oracle_bound(trace.requests, geometry, builder)
    for seed in range(4):
        rng = random.Random(seed)
        by_tenant = {t: f"w{rng.randrange(3)}" for t in trace.tenants}
        for sticky in (True, False):
            records = [
                _record(r, by_tenant[r.tenant] if sticky else f"w{rng.randrange(3)}", r.offset)
                for r in trace.requests
            ]
            shares = hit_shares(trace.requests, records, geometry, builder)
            assert shares.captured_tokens <= bound.pooled_cached_tokens
    assert bound.pooled_cached_tokens < bound.unbounded_cached_tokens
