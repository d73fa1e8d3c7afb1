"""The named load-test scenarios and the workload options they use."""

from __future__ import annotations

import pytest

from load_tests.scenarios import SCENARIOS, ChurnEvent, get_scenario
from load_tests.workload import WorkloadConfig, generate_trace, read_trace, write_trace


def test_every_scenario_named_in_the_issue_exists() -> None:
    """Operators find each scenario by the name the docs use."""
    assert {
        "many_small_tenants", "hot_tenant", "cache_pressure", "worker_churn", "replicas",
        "salted_shared_text", "version_rollout", "prompt_shape",
    } <= set(SCENARIOS)  # fmt: skip


def test_an_unknown_scenario_names_the_known_ones() -> None:
    """A typo gets the list of valid names back."""
    with pytest.raises(KeyError, match="hot_tenant"):
        get_scenario("hot-tennant")


@pytest.mark.parametrize("name", sorted(n for n in SCENARIOS if n != "prompt_shape"))
def test_short_forms_are_seconds_long_and_reproducible(name: str) -> None:
    """Each short form is a few seconds of traffic and the same trace every time."""
    short = get_scenario(name).short()
    first, second = short.trace(), short.trace()
    assert 0 < len(first.requests) < 200
    assert first.requests[-1].offset < short.duration <= 5
    assert [r.to_json() for r in first.requests] == [r.to_json() for r in second.requests]


def test_hot_tenant_concentrates_traffic_on_one_tenant() -> None:
    """In the hot-tenant scenario one tenant sends more than half of the requests."""
    trace = get_scenario("hot_tenant").trace()
    counts: dict[str, int] = {}
    for r in trace.requests:
        counts[r.tenant] = counts.get(r.tenant, 0) + 1
    assert max(counts.values()) > 0.5 * len(trace.requests)


def test_salted_tenants_send_identical_heads_with_their_own_salts() -> None:
    """Tenants of one text group send the same system prompt, each with its own cache_salt."""
    trace = get_scenario("salted_shared_text").short().trace()
    system_by_tenant = {}
    for r in trace.requests:
        assert r.body["cache_salt"] == r.tenant
        if r.body.get("messages"):
            system_by_tenant[r.tenant] = r.body["messages"][0]["content"]
    texts = list(system_by_tenant.values())
    assert len(set(texts)) < len(texts), "some tenants must share their head text"


def test_rollout_moves_every_tenant_to_a_new_version_and_labels_it() -> None:
    """After the rollout offset, requests carry the next prefix version in the header."""
    scenario = get_scenario("version_rollout").short()
    at = scenario.workload.rollout_at
    assert at is not None
    trace = scenario.trace()
    new_conversations = [r for r in trace.requests if r.turn == 1 and r.offset >= at]
    assert new_conversations
    assert all(r.prefix_version >= 1 for r in new_conversations)
    assert all(r.headers["x-prefix-version"] == f"v{r.prefix_version}" for r in trace.requests)


def test_churn_events_are_inside_the_run() -> None:
    """A churn time outside (0, 1) of the run is refused."""
    with pytest.raises(ValueError, match="fractions"):
        ChurnEvent(1.5, "add", "w4")
    churn = get_scenario("worker_churn")
    assert {e.action for e in churn.churn} == {"add", "remove", "crash"}
    assert all(e.worker in churn.worker_ids for e in churn.churn)


def test_trace_headers_round_trip_through_the_file(tmp_path: object) -> None:
    """Per-request headers survive write_trace/read_trace."""
    from pathlib import Path

    config = WorkloadConfig(seed=1, tenants=3, rate=10, duration=2, version_header="x-v",
                            head_tokens=(100, 200))  # fmt: skip
    trace = generate_trace(config)
    path = write_trace(Path(str(tmp_path)) / "t.jsonl", trace)
    again = read_trace(path)
    assert [r.headers for r in again.requests] == [r.headers for r in trace.requests]
    assert all(r.headers == {"x-v": f"v{r.prefix_version}"} for r in again.requests)


def test_compare_targets_carry_tuning_overrides() -> None:
    """--tuning adds a labelled cache_aware run with those thresholds; bad names are refused."""
    from load_tests.compare import parse_tuning, targets_for

    targets = targets_for(["round_robin"], ["sglang-router"], ["load_factor=2,min_match_blocks=1"])
    labels = [t.label for t in targets]
    assert labels == [
        "round_robin", "cache_aware@load_factor=2,min_match_blocks=1",
        "sglang-router/cache_aware", "sglang-router/round_robin",
    ]  # fmt: skip
    assert targets[1].tuning == (("load_factor", 2.0), ("min_match_blocks", 1))
    with pytest.raises(ValueError, match="load_factor"):
        parse_tuning("loadfactor=2")
