"""Synthetic tenants and the seeded trace generator (load_tests.tenants, load_tests.workload)."""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from load_tests.tenants import BYTES_PER_TOKEN, build_head, make_tenants, zipf_weights
from load_tests.workload import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    TraceRequest,
    WorkloadConfig,
    generate_trace,
    read_trace,
    write_trace,
)

SMALL = WorkloadConfig(seed=11, tenants=8, rate=40.0, duration=20.0, head_tokens=(400, 800))


def _as_json(requests: list[TraceRequest]) -> str:
    return json.dumps([r.to_json() for r in requests], sort_keys=True)


def test_same_seed_gives_the_same_trace() -> None:
    """Two traces from the same config are identical, request for request and byte for byte."""
    first = generate_trace(SMALL)
    second = generate_trace(SMALL)
    assert len(first.requests) > 100
    assert _as_json(first.requests) == _as_json(second.requests)
    assert first.meta == second.meta


def test_another_seed_gives_another_trace() -> None:
    """Changing the seed changes arrivals and text."""
    other = WorkloadConfig(**{**SMALL.to_json(), "seed": 12})
    assert _as_json(generate_trace(SMALL).requests) != _as_json(generate_trace(other).requests)


def test_offsets_are_ordered_and_within_duration() -> None:
    """Requests come in offset order inside [0, duration), indexed from 0, near the set rate."""
    trace = generate_trace(SMALL)
    offsets = [r.offset for r in trace.requests]
    assert offsets == sorted(offsets)
    assert offsets[0] >= 0.0
    assert offsets[-1] < SMALL.duration
    assert [r.index for r in trace.requests] == list(range(len(trace.requests)))
    # Bursts only add traffic: at least the base rate, at most the all-burst rate (with slack).
    expected = SMALL.rate * SMALL.duration
    assert 0.8 * expected <= len(trace.requests) <= SMALL.burst_factor * expected


def test_bursts_raise_the_local_rate() -> None:
    """With bursts on, some one-second windows see far more than the mean rate."""
    config = WorkloadConfig(seed=3, tenants=4, rate=20.0, duration=60.0, burst_every=5.0,
                            burst_length=2.0, burst_factor=5.0, head_tokens=(200, 300))  # fmt: skip
    per_second = Counter(int(r.offset) for r in generate_trace(config).requests)
    assert max(per_second.values()) >= 2.5 * config.rate


def test_max_requests_bounds_the_trace() -> None:
    """`max_requests` caps the number of requests generated."""
    config = WorkloadConfig(**{**SMALL.to_json(), "max_requests": 25})
    assert len(generate_trace(config).requests) == 25


def test_zipf_weights_are_normalised_and_skewed() -> None:
    """Zipf weights sum to 1 and fall as 1/rank**s."""
    weights = zipf_weights(10, 1.0)
    assert sum(weights) == pytest.approx(1.0)
    assert weights[0] / weights[1] == pytest.approx(2.0)
    assert weights[0] / weights[9] == pytest.approx(10.0)


def test_tenant_popularity_follows_zipf() -> None:
    """The most popular tenant gets about its Zipf share, far more than the least popular."""
    config = WorkloadConfig(seed=5, tenants=10, rate=200.0, duration=30.0, head_tokens=(200, 300))
    trace = generate_trace(config)
    counts = Counter(r.tenant for r in trace.requests)
    share = counts["t00"] / len(trace.requests)
    assert share == pytest.approx(zipf_weights(10, 1.0)[0], abs=0.03)
    assert counts["t00"] > 5 * counts["t09"]
    assert counts["t00"] > counts["t01"] > counts["t04"]


def test_conversation_turns_extend_the_previous_turn() -> None:
    """Turn n+1 of a conversation sends turn n's messages, then an answer and a new question."""
    trace = generate_trace(SMALL)
    by_conversation: dict[str, list[TraceRequest]] = defaultdict(list)
    for request in trace.requests:
        if request.conversation is not None:
            by_conversation[request.conversation].append(request)
    multi_turn = [turns for turns in by_conversation.values() if len(turns) >= 3]
    assert multi_turn, "the trace should hold conversations of three turns or more"
    for turns in by_conversation.values():
        assert [r.turn for r in turns] == list(range(1, len(turns) + 1))
        for previous, current in itertools.pairwise(turns):
            before, after = previous.body["messages"], current.body["messages"]
            assert after[: len(before)] == before
            assert [m["role"] for m in after[len(before) :]] == ["assistant", "user"]
            assert current.prefix_version == previous.prefix_version
        assert len(turns) <= SMALL.max_turns


def test_heads_are_shared_within_a_tenant_and_version() -> None:
    """Every chat request of one tenant and prefix version starts with the same head."""
    trace = generate_trace(WorkloadConfig(**{**SMALL.to_json(), "version_every": 0.0}))
    tenants = {t.id: t for t in make_tenants(SMALL.tenants, seed=SMALL.seed,
                                             head_tokens=SMALL.head_tokens)}  # fmt: skip
    heads: dict[str, list[dict[str, str]]] = {}
    for request in trace.requests:
        if request.path != CHAT_PATH:
            continue
        head = build_head(tenants[request.tenant], request.prefix_version).messages()
        assert request.body["messages"][: len(head)] == head
        heads[request.tenant] = head
    systems = [h[0]["content"] for h in heads.values()]
    assert len(heads) >= 4
    assert len(set(systems)) == len(systems), "tenants must not share a head by accident"


def test_new_prefix_version_keeps_the_head_up_to_a_cut() -> None:
    """A new version shares the old head's leading text, then differs from some point on."""
    tenant = make_tenants(1, seed=1, head_tokens=(2000, 2000))[0]
    v0, v1, v2 = (build_head(tenant, v).text() for v in range(3))
    for old, new in ((v0, v1), (v1, v2)):
        common = next(i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b)
        assert common > 0
        assert old != new
    assert build_head(tenant, 1).text() == v1, "a version's head is reproducible"


def test_versions_change_during_a_trace() -> None:
    """With version changes on, some requests carry a later prefix version than 0."""
    config = WorkloadConfig(**{**SMALL.to_json(), "version_every": 2.0})
    versions = {r.prefix_version for r in generate_trace(config).requests}
    assert 0 in versions
    assert max(versions) >= 1


def test_heads_are_thousands_of_tokens_as_configured() -> None:
    """A tenant's head is about its configured size in tokens (4 bytes per token)."""
    for tenant in make_tenants(12, seed=2, head_tokens=(2000, 4000)):
        size = len(build_head(tenant, 0).text().encode()) / BYTES_PER_TOKEN
        assert 2000 * 0.85 <= size <= 4000 * 1.15
        assert size == pytest.approx(tenant.head_tokens, rel=0.15)


def test_requests_are_well_formed_openai_bodies() -> None:
    """Bodies carry model, max_tokens and the stream flag; streams ask for the usage chunk."""
    trace = generate_trace(SMALL)
    paths = Counter(r.path for r in trace.requests)
    assert paths[CHAT_PATH] > 0
    assert paths[COMPLETIONS_PATH] > 0
    for r in trace.requests:
        assert r.body["model"] == SMALL.model
        assert r.body["stream"] is r.stream
        assert (r.body.get("stream_options") == {"include_usage": True}) is r.stream
        assert r.api_key == f"{SMALL.api_key_prefix}{r.tenant}"
        if r.path == COMPLETIONS_PATH:
            assert isinstance(r.body["prompt"], str)
            assert r.conversation is None
        else:
            assert r.body["messages"][-1]["role"] == "user"


@pytest.mark.parametrize("name", ["trace.jsonl", "trace.jsonl.gz"])
def test_trace_round_trips_through_a_file(tmp_path: Path, name: str) -> None:
    """A trace written and read back is equal to the original, gzip or not."""
    trace = generate_trace(SMALL)
    path = write_trace(tmp_path / name, trace)
    again = read_trace(path)
    assert again.requests == trace.requests
    assert again.meta == trace.meta
    assert again.tenants == trace.tenants


def test_reading_a_bad_trace_line_names_the_line(tmp_path: Path) -> None:
    """A malformed request line is reported with its file and line number."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"format": "prefix-router-trace", "version": 1, "meta": {}}\n{"index": 0}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_trace(path)
