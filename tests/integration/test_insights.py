"""Insights end to end: a prompt-shape trace through a real router in front of simulated
workers. The advisor flags exactly the route that puts a request id before its stable head,
says where the prompt diverges, and predicts what moving the id to the end saves (checked by
rerunning the trace with the id at the end); a prefix-version rollout shows its warmup under
the new version; the savings add up to the raw usage; and no prompt text leaks anywhere."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from rich.console import Console

from load_tests.insights_report import render_insights_markdown
from load_tests.shapes import rollout_config, shape_trace
from load_tests.workload import Trace
from router.core.render import render_chat
from router.insights_cli import run as insights_cli
from router.telemetry import JsonFormatter
from tests.integration.conftest import (
    ADMIN_TOKEN,
    RouterFactory,
    RunningRouter,
    Sim,
    SimFactory,
    metric_value,
    settings_for,
)

REQUESTS = 60
HEAD_TOKENS = 2000
WORKER_BLOCK_TOKENS = 16
"""The simulators' block size: 'within one block' on the workers' side."""
PRICE_PER_MTOK = 3.0


@dataclass
class Answer:
    route: str
    version: str
    prompt_tokens: int
    cached_tokens: int


@pytest.fixture
def router_log() -> Iterator[io.StringIO]:
    """Everything the router logs during the test, formatted as in production (JSON lines)."""
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setFormatter(JsonFormatter())
    loggers = [logging.getLogger(name) for name in ("prefix_router", "aiohttp")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    yield captured
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


async def _start(router: RouterFactory, sims: list[Sim], trace: Trace) -> RunningRouter:
    keys = [{"tenant": tenant, "key": key} for tenant, key in sorted(trace.tenants.items())]
    settings = settings_for(
        sims,
        tenants={"api_keys": keys},
        insights={"sample_rate": 1.0, "min_samples": 4, "input_price_per_mtok": PRICE_PER_MTOK},
        telemetry={"access_log": True, "log_level": "debug"},
    )
    return await router(settings)


async def _send_all(url: str, trace: Trace) -> list[Answer]:
    """Send the trace in order, one request at a time; the usage each answer reported."""
    answers = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for request in trace.requests:
            headers = {"Authorization": f"Bearer {request.api_key}", **request.headers}
            usage: dict[str, Any] | None = None
            async with client.stream(
                "POST", request.path, json=request.body, headers=headers
            ) as response:
                assert response.status_code == 200, await response.aread()
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"usage"' in line:
                        usage = json.loads(line[6:]).get("usage") or usage
            assert usage is not None
            answers.append(
                Answer(
                    request.headers["x-prefix-router-route"],
                    request.headers["x-prefix-version"],
                    usage["prompt_tokens"],
                    usage["prompt_tokens_details"]["cached_tokens"],
                )
            )
    return answers


async def _insights(running: RunningRouter) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(
            running.url + "/admin/insights", headers=running.admin_headers()
        )
    assert response.status_code == 200
    answer: dict[str, Any] = response.json()
    return answer


def _mean_cached(answers: list[Answer], route: str) -> float:
    cached = [a.cached_tokens for a in answers if a.route == route]
    return sum(cached) / len(cached)


def _shape_entry(insights: dict[str, Any], route: str) -> dict[str, Any]:
    (entry,) = [e for e in insights["shape"]["routes"] if e["route"] == route]
    return entry


async def _reset(workers: list[Sim]) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        for sim in workers:
            (await client.post(sim.url + "/sim/reset")).raise_for_status()


async def test_advisor_flags_the_bad_route_and_predicts_the_reordering_gain(
    sims: SimFactory, router: RouterFactory
) -> None:
    """Only the route with the id before its head is flagged, at the id's offset (within one
    block), and its predicted saving is within 10% of what the rerun with the id moved to the
    end achieves."""
    workers = sims(3)
    config = rollout_config(requests=REQUESTS, head_tokens=HEAD_TOKENS)
    trace = shape_trace(config)
    first = await _start(router, workers, trace)
    before = await _send_all(first.url, trace)
    insights = await _insights(first)

    assert insights["shape"]["flagged_routes"] == ["bad"]
    bad = _shape_entry(insights, "bad")
    assert bad["flagged"]
    assert bad["varying_head_shape"]
    assert not _shape_entry(insights, "good")["flagged"]

    # Where the id really starts: in the router's rendering (the advisor's coordinates) and
    # in the workers' (their template opens with "<|system|>", then the content).
    sample = next(r for r in trace.requests if r.headers["x-prefix-router-route"] == "bad")
    content = sample.body["messages"][0]["content"]
    id_in_content = len("Request ")
    rendered = render_chat(sample.body["messages"])
    true_chars = rendered.index(content) + id_in_content
    worker_tokens = (len("<|system|>") + id_in_content) / 4
    block_chars = insights["settings"]["block_chars"]
    divergence = bad["divergence"]
    assert abs(divergence["char_offset"] - true_chars) < block_chars
    assert divergence["block"] == true_chars // block_chars
    assert abs(divergence["token_offset"] - worker_tokens) < WORKER_BLOCK_TOKENS

    await _reset(workers)
    moved = shape_trace(
        rollout_config(requests=REQUESTS, head_tokens=HEAD_TOKENS, id_position="end")
    )
    second = await _start(router, workers, moved)
    after = await _send_all(second.url, moved)
    assert (await _insights(second))["shape"]["flagged_routes"] == []

    achieved = _mean_cached(after, "bad") - _mean_cached(before, "bad")
    estimate = bad["savings_tokens_per_request"]
    print(
        f"divergence: reported char {divergence['char_offset']} / token "
        f"{divergence['token_offset']}, true char {true_chars} / worker token {worker_tokens}; "
        f"estimate {estimate} tokens/request, rerun achieved {achieved:.1f} "
        f"({100 * (estimate - achieved) / achieved:+.1f}%)"
    )
    assert achieved > HEAD_TOKENS / 2
    assert abs(estimate - achieved) <= 0.10 * achieved


async def test_rollout_savings_and_redaction(
    sims: SimFactory, router: RouterFactory, router_log: io.StringIO
) -> None:
    """A version rollout shows warmup misses under the new version, then recovery; the savings
    report adds up to the raw usage; and no prompt text appears in the insights, the metrics,
    the logs, the CLI or the Markdown report."""
    workers = sims(2)
    trace = shape_trace(rollout_config(requests=REQUESTS, head_tokens=HEAD_TOKENS))
    running = await _start(router, workers, trace)
    answers = await _send_all(running.url, trace)
    insights = await _insights(running)
    async with httpx.AsyncClient(timeout=10) as client:
        metrics = (await client.get(running.url + "/metrics")).text

    # Rollout: v2's first request misses the new head and counts as its warmup; v2 recovers.
    versions = {(v["route"], v["version"]): v for v in insights["versions"]}
    v1, v2 = versions[("rollout", "v1")], versions[("rollout", "v2")]
    print(
        f"rollout: v1 {v1['state']} hit rate {v1['hit_rate']}; v2 {v2['state']}, warmup "
        f"{v2['warmup']}, hit rate {v2['hit_rate']}, after warmup {v2['hit_rate_after_warmup']}"
    )
    assert v1["state"] == "baseline"
    assert v1["warmup"]["requests"] == 0
    assert v2["state"] == "warm"
    assert v2["warmup"]["requests"] >= 1
    assert v2["warmup"]["missed_tokens"] > HEAD_TOKENS / 2
    assert v2["hit_rate_after_warmup"] > 0.8
    warmup_metric = metric_value(
        metrics, "prefix_router_warmup_prompt_tokens_total", route="rollout", prefix_version="v2"
    )
    assert warmup_metric == v2["warmup"]["prompt_tokens"]
    assert (
        metric_value(metrics, "prefix_router_warmup_prompt_tokens_total", prefix_version="v1") == 0
    )
    assert metric_value(metrics, "prefix_router_prompt_shape_flagged", route="bad") == 1
    assert metric_value(metrics, "prefix_router_prompt_shape_flagged", route="good") == 0

    # Savings add up: per route and in total, to the usage the workers reported.
    savings = insights["savings"]
    for route in ("bad", "good", "rollout"):
        rows = [r for r in savings["rows"] if r["route"] == route]
        mine = [a for a in answers if a.route == route]
        assert sum(r["requests"] for r in rows) == len(mine)
        assert sum(r["prompt_tokens"] for r in rows) == sum(a.prompt_tokens for a in mine)
        assert sum(r["cached_tokens"] for r in rows) == sum(a.cached_tokens for a in mine)
    totals = savings["totals"]
    raw_prompt = sum(a.prompt_tokens for a in answers)
    raw_cached = sum(a.cached_tokens for a in answers)
    assert (totals["prompt_tokens"], totals["cached_tokens"]) == (raw_prompt, raw_cached)
    assert totals["prefill_tokens_saved"] == raw_cached
    assert totals["uncached_tokens"] == raw_prompt - raw_cached
    saved = raw_cached * (1 - 0.1) * PRICE_PER_MTOK / 1e6
    assert totals["money"]["saved"] == pytest.approx(saved, abs=1e-6)
    assert sum(r["money"]["saved"] for r in savings["rows"]) == pytest.approx(saved, abs=1e-5)
    assert totals["ttft_ms"]["misses"] > totals["ttft_ms"]["hits"]
    assert savings["prefill"]["source"] == "measured"
    assert totals["gpu_seconds_saved"] > 0
    assert metric_value(metrics, "prefix_router_cached_tokens_total") == raw_cached

    # Surfaces: the CLI and the Markdown report render the same figures.
    console = Console(file=io.StringIO(), width=240, color_system=None)
    args = argparse.Namespace(url=running.url, admin_token=ADMIN_TOKEN, json=False, timeout=10.0)
    assert await asyncio.to_thread(insights_cli, args, console) == 0
    cli_text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "flagged bad" in cli_text
    assert "rollout" in cli_text
    markdown = render_insights_markdown(insights)
    assert "## Insights" in markdown
    assert "`bad`" in markdown

    # Nothing of the prompts' text: ids, head sentences, questions.
    distinctive = _distinctive_strings(trace)
    outputs = {
        "insights": json.dumps(insights),
        "metrics": metrics,
        "log": router_log.getvalue(),
        "cli": cli_text,
        "markdown": markdown,
    }
    assert '"route":"bad"' in outputs["log"].replace(" ", "")  # the log did capture requests
    leaks = [(where, s) for where, text in outputs.items() for s in distinctive if s in text]
    assert leaks == []


def _distinctive_strings(trace: Trace) -> set[str]:
    """Pieces of prompt text no output may contain: each request's id and question, and
    slices of every head."""
    found: set[str] = set()
    for request in trace.requests:
        system, user = (m["content"] for m in request.body["messages"])
        for text in (system, user):
            if text.startswith("Request "):
                found.add(text.split(" ")[1])  # the id, e.g. 7F3A-00000012
            for start in range(0, max(1, len(text) - 24), 997):
                found.add(text[start : start + 24])
    return {s for s in found if len(s) >= 12}
