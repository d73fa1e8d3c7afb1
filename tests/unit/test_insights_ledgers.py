"""Prefix-version warmup attribution, the savings ledger, and the report surfaces (Markdown,
CLI wiring), all without a network."""

from __future__ import annotations

import argparse
import io

import pytest
from rich.console import Console

from load_tests.insights_report import render_insights_markdown
from router.config import InsightsSettings
from router.insights import InsightsRecorder, Pricing, SavingsBook, VersionTracker, reads_to_repay
from router.insights_cli import add_parser, render


def _tracker() -> VersionTracker:
    return VersionTracker(max_versions=4, recovery=0.8, max_requests=5)


def test_a_new_versions_first_misses_are_warmup_until_it_recovers() -> None:
    """After a steady v1, v2's misses count as warmup; its first good hit ends the warmup."""
    versions = _tracker()
    seen = [versions.observe("r", "t", "v1", 1000, cached, 0.0) for cached in (0, 900, 900, 900)]
    assert seen == [False] * 4  # the first version has nothing to recover to
    assert versions.observe("r", "t", "v2", 1000, 0, 1.0) is True
    assert versions.observe("r", "t", "v2", 1000, 100, 1.1) is True
    assert versions.observe("r", "t", "v2", 1000, 900, 1.2) is False
    assert versions.observe("r", "t", "v2", 1000, 0, 1.3) is False  # a later miss is a miss
    rows = {row["version"]: row for row in versions.report()}
    assert rows["v1"]["state"] == "baseline"
    assert rows["v2"]["state"] == "warm"
    assert rows["v2"]["warmup"] == {
        "requests": 2, "prompt_tokens": 2000, "cached_tokens": 100, "missed_tokens": 1900,
    }  # fmt: skip
    assert rows["v2"]["requests"] == 4
    assert rows["v2"]["cached_tokens"] == 1000


def test_a_version_that_never_recovers_stops_counting_as_warmup() -> None:
    """A new version that breaks caching is warmup only for max_requests requests, then its
    misses count again (so the hit-rate alert still fires)."""
    versions = _tracker()
    for _ in range(5):
        versions.observe("r", "t", "v1", 1000, 900, 0.0)
    flags = [versions.observe("r", "t", "v2", 1000, 0, 1.0) for _ in range(8)]
    assert flags == [True] * 5 + [False] * 3
    (v2,) = [row for row in versions.report() if row["version"] == "v2"]
    assert v2["state"] == "stalled"


def test_versions_are_kept_per_tenant_and_bounded() -> None:
    """Tenants warm up separately; old versions beyond max_versions are dropped."""
    versions = _tracker()
    for version in range(10):
        versions.observe("r", "a", f"v{version}", 100, 90, float(version))
    assert versions.tracked() == (1, 4)
    for _ in range(4):
        versions.observe("r", "b", "v9", 100, 90, 20.0)
    assert versions.tracked() == (2, 5)


def test_savings_add_up_and_price_reads_and_writes() -> None:
    """Rows sum to the totals, cached tokens are the prefill saved, and money follows the
    configured price and multipliers."""
    book = SavingsBook()
    usage = [("a", "t1", 1000, 900, 0.05), ("a", "t1", 1000, 0, 0.25), ("b", "t2", 400, None, None)]
    for route, tenant, prompt, cached, ttft in usage:
        book.observe(route, tenant, prompt, cached, ttft)
    pricing = Pricing(input_price_per_mtok=2.0, cached_read_multiplier=0.1,
                      cache_write_multiplier=1.25, prefill_tokens_per_s=10_000.0)  # fmt: skip
    report = book.report(pricing)
    totals = report["totals"]
    assert (totals["prompt_tokens"], totals["cached_tokens"], totals["requests"]) == (2400, 900, 3)
    assert totals["prefill_tokens_saved"] == 900
    assert totals["without_details"] == 1
    assert sum(r["prompt_tokens"] for r in report["rows"]) == 2400
    assert totals["gpu_seconds_saved"] == pytest.approx(0.09)
    money = totals["money"]
    assert money["cost_without_cache"] == pytest.approx(2400 * 2e-6)
    assert money["saved"] == pytest.approx(900 * 0.9 * 2e-6)
    assert money["cost_with_write_premium"] == pytest.approx((1500 * 1.25 + 90) * 2e-6)
    assert totals["ttft_ms"]["hits"] == pytest.approx(50.0)
    assert totals["ttft_ms"]["misses"] == pytest.approx(250.0)


def test_prefill_throughput_is_measured_from_ttft_without_a_configured_one() -> None:
    """TTFT that grows by 20 us per uncached token gives 50,000 tokens/s."""
    book = SavingsBook()
    for uncached in (0, 500, 1000, 2000, 4000):
        book.observe("r", "t", 4000, 4000 - uncached, 0.01 + 20e-6 * uncached)
    per_token, source = book.seconds_per_token(Pricing(input_price_per_mtok=None))
    assert source == "measured"
    assert per_token == pytest.approx(20e-6)
    assert book.report(Pricing(input_price_per_mtok=None))["totals"]["money"] is None


def test_break_even_reads_match_the_published_ratios() -> None:
    """A 1.25x write repays after one 0.1x read, a 2x write after two."""
    assert reads_to_repay(1.25, 0.1) == pytest.approx(0.25 / 0.9)
    book = SavingsBook()
    book.observe("r", "t", 1000, 750, None)
    rows = book.report(Pricing(input_price_per_mtok=1.0))["break_even"]
    needed = {row["write_multiplier"]: row["reuses_needed"] for row in rows}
    assert needed == {1.25: 1, 2.0: 2}
    assert all(row["observed_reads_per_written_token"] == 3.0 for row in rows)
    assert [row["repaid"] for row in rows] == [True, True]


def _recorder() -> InsightsRecorder:
    return InsightsRecorder(
        InsightsSettings(route_by=("path", "model", "header"), min_samples=2, sample_rate=0.25),
        route_header="x-prefix-route",
        block_chars=64,
        routing_chain_matches=True,
        key=3,
    )


def test_routes_are_named_by_the_configured_parts_and_sampled_systematically() -> None:
    """Route = endpoint/model/header; the first min_samples requests and then one in four
    are sampled."""
    recorder = _recorder()
    assert recorder.route_of("chat", "m", {"x-prefix-route": "faq"}) == "chat/m/faq"
    assert recorder.route_of("completions", "", {}) == "completions"
    samples = [recorder.begin("chat", "m", {}, "t").sample for _ in range(10)]
    assert samples == [True, True, False, False, False, True, False, False, False, True]


def test_markdown_and_terminal_reports_render_a_snapshot() -> None:
    """The load-test section and the CLI tables show routes, versions and savings."""
    recorder = _recorder()
    for cached in (0, 900, 900):
        ticket = recorder.begin("chat", "m", {"x-prefix-route": "faq"}, "t")
        recorder.finish(ticket, 1000, cached, 0.1, "v1")
    snapshot = recorder.snapshot()
    markdown = render_insights_markdown(snapshot)
    assert "## Insights" in markdown
    assert "`chat/m/faq`" in markdown
    assert "`v1`" in markdown
    assert "Insights were off" in render_insights_markdown({"enabled": False})
    console = Console(file=io.StringIO(), width=200, color_system=None)
    render(snapshot, console)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "chat/m/faq" in out
    assert "Break-even" in out


def test_the_cli_command_parses_its_flags() -> None:
    """`add_parser` adds `insights --url --admin-token` to a subcommand parser."""
    parser = argparse.ArgumentParser(prog="prefix-router")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["insights", "--url", "http://127.0.0.1:9", "--admin-token", "x"])
    assert (args.command, args.url, args.admin_token, args.json) == (
        "insights", "http://127.0.0.1:9", "x", False,
    )  # fmt: skip
