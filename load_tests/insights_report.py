"""The insights section of the load-test report, as Markdown, from ``GET /admin/insights``.

`render_insights_markdown` takes the JSON the router answers and returns a section with
three parts: prompt-shape findings (flagged routes first), prefix versions with their warmup,
and the savings report with the break-even view. It reads only the keys it needs and
tolerates missing ones, so a report of an older router still renders.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from router.insights_cli import format_pct, format_scalar


def _cell(value: Any) -> str:
    """A Markdown table cell: the CLI's formatting, pipes escaped, one line."""
    return format_scalar(value, missing="—").replace("|", "\\|").replace("\n", "↵")


def _pct(value: Any) -> str:
    return format_pct(value, missing="—")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _shape_section(shape: dict[str, Any]) -> list[str]:
    entries = shape.get("routes") or []
    flagged = shape.get("flagged_routes") or []
    lines = ["### Prompt shape", ""]
    if flagged:
        lines.append(
            f"Flagged routes: {', '.join(f'`{r}`' for r in flagged)}: long content recurs in "
            "every request behind content that varies, so the prefix cache cannot reuse it."
        )
    else:
        lines.append("No route is flagged: recurring content sits in the cacheable prefix.")
    lines.append("")
    if not entries:
        return [*lines, "No requests were sampled.", ""]
    rows = []
    for e in entries:
        divergence = e.get("divergence") or {}
        where = (
            f"block {divergence['block']}, token ~{divergence['token_offset']}"
            if divergence
            else "—"
        )
        rows.append(
            [
                f"`{e.get('route')}`",
                _cell(e.get("tenant")),
                _cell(e.get("flagged")),
                _cell(e.get("samples")),
                _cell(e.get("chained_tokens")),
                where,
                _cell(e.get("stable_tokens_after_divergence")),
                f"`{e['varying_head_shape']}`" if e.get("varying_head_shape") else "—",
                _cell(e.get("savings_tokens_per_request")),
            ]
        )
    headers = (
        "Route", "Tenant", "Flagged", "Samples", "Shared prefix (tokens)", "Divergence",
        "Stable after (tokens)", "Varying head (redacted)", "Saved by reordering (tokens/req)",
    )  # fmt: skip
    return [*lines, *_table(headers, rows), ""]


def _versions_section(versions: list[dict[str, Any]]) -> list[str]:
    lines = ["### Prefix versions", ""]
    if not versions:
        return [*lines, "No versioned traffic.", ""]
    rows = []
    for v in versions:
        warmup = v.get("warmup") or {}
        rows.append(
            [
                f"`{v.get('route')}`",
                f"`{v.get('version')}`",
                _cell(v.get("state")),
                _cell(v.get("requests")),
                _cell(v.get("cached_tokens")),
                _pct(v.get("hit_rate")),
                _cell(warmup.get("requests")),
                _cell(warmup.get("missed_tokens")),
                _pct(v.get("hit_rate_after_warmup")),
            ]
        )
    headers = (
        "Route", "Version", "State", "Requests", "Cached tokens", "Hit rate",
        "Warmup requests", "Warmup missed tokens", "Hit rate after warmup",
    )  # fmt: skip
    return [*lines, *_table(headers, rows), ""]


def _money(figures: dict[str, Any]) -> str:
    money = figures.get("money")
    if not money:
        return "—"
    return f"{money['saved']:,.4f} {money['currency']}"


def _savings_section(savings: dict[str, Any]) -> list[str]:
    lines = ["### Savings", ""]
    rows_in = savings.get("rows") or []
    if not rows_in:
        return [*lines, "No answered requests with usage.", ""]
    rows = []
    for r in [*rows_in, {"route": "**total**", "tenant": "", **(savings.get("totals") or {})}]:
        ttft = r.get("ttft_ms") or {}
        rows.append(
            [
                str(r.get("route")) if r.get("route") == "**total**" else f"`{r.get('route')}`",
                _cell(r.get("tenant")),
                _cell(r.get("requests")),
                _cell(r.get("prompt_tokens")),
                _cell(r.get("cached_tokens")),
                _pct(r.get("hit_rate")),
                _cell(ttft.get("hits")),
                _cell(ttft.get("misses")),
                _cell(r.get("gpu_seconds_saved")),
                _money(r),
            ]
        )
    headers = (
        "Route", "Tenant", "Requests", "Prompt tokens", "Cached (prefill saved)", "Hit rate",
        "TTFT hits (ms)", "TTFT misses (ms)", "GPU-s saved", "Saved",
    )  # fmt: skip
    lines += _table(headers, rows)
    prefill = savings.get("prefill") or {}
    if prefill.get("source"):
        lines += [
            "",
            f"GPU-seconds from a prefill throughput of {_cell(prefill.get('tokens_per_s'))} "
            f"tokens/s ({prefill['source']}).",
        ]
    even = savings.get("break_even") or []
    if even:
        read = _cell((savings.get("pricing") or {}).get("cached_read_multiplier"))
        lines += ["", f"Break-even of a cache-write premium (reads at {read}x):", ""]
        lines += _table(
            ("Write price", "Reads to repay", "Observed reads per written token", "Repaid"),
            [
                [
                    f"{_cell(b.get('write_multiplier'))}x"
                    + (" (configured)" if b.get("configured") else ""),
                    _cell(b.get("reuses_needed")),
                    _cell(b.get("observed_reads_per_written_token")),
                    _cell(b.get("repaid")),
                ]
                for b in even
            ],
        )
    return [*lines, ""]


def render_insights_markdown(insights: dict[str, Any]) -> str:
    """The ``## Insights`` section of the load-test report for one router's insights."""
    lines = ["## Insights", ""]
    if not insights.get("enabled", False):
        return "\n".join([*lines, "Insights were off on this router.", ""])
    lines += _shape_section(insights.get("shape") or {})
    lines += _versions_section(insights.get("versions") or [])
    lines += _savings_section(insights.get("savings") or {})
    return "\n".join(lines)
