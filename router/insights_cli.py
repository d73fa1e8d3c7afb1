"""``prefix-router insights``: the router's insights as tables in the terminal.

    prefix-router insights --url http://127.0.0.1:9090 [--admin-token T] [--json]

Reads ``GET /admin/insights`` (the admin listener's URL, or the public one with
``server.admin_on_public_port``) and prints three tables: prompt-shape findings (flagged
routes first, with the redacted shape of the varying head and the tokens a reordering would
save), prefix versions with their warmup, and the savings report with the break-even view.
``--json`` prints the raw answer instead. Exit status: 0 on success, 1 when the router cannot
be reached or answers an error (401 for a wrong token, 404 when the admin API is off).

`router.cli` wires it in with `add_parser` and `run`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table
from rich.text import Text


def add_parser(subparsers: Any) -> None:
    """Add the ``insights`` command to ``prefix-router``'s subcommands."""
    parser = subparsers.add_parser(
        "insights", help="show the prompt-shape advisor, prefix versions and savings"
    )
    parser.add_argument("--url", required=True, help="router base URL (its admin listener)")
    parser.add_argument("--admin-token", help="the router's server.admin_token")
    parser.add_argument("--json", action="store_true", help="print the raw JSON")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")


def fetch(url: str, admin_token: str | None, timeout: float = 10.0) -> dict[str, Any]:
    """The router's ``/admin/insights``; raises `httpx.HTTPError` on failure."""
    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    response = httpx.get(url.rstrip("/") + "/admin/insights", headers=headers, timeout=timeout)
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer


def run(args: argparse.Namespace, console: Console | None = None) -> int:
    console = console or Console()
    try:
        insights = fetch(args.url, args.admin_token, getattr(args, "timeout", 10.0))
    except httpx.HTTPStatusError as exc:
        message = _error_message(exc.response)
        console.print(Text(f"prefix-router insights: HTTP {exc.response.status_code}: {message}"))
        return 1
    except (httpx.HTTPError, ValueError) as exc:
        console.print(Text(f"prefix-router insights: cannot read {args.url}: {exc}"))
        return 1
    if args.json:
        console.print_json(json.dumps(insights))
        return 0
    render(insights, console)
    return 0


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def _text(value: Any) -> Text:
    """Plain text, never markup: route names come from clients and redacted shapes hold
    brackets (``[A-Z]{4}``) that rich would read as styles."""
    return Text("-" if value is None else str(value))


def format_scalar(value: Any, missing: str = "-") -> str:
    """One insights value as text: thousands separators, 4 significant digits below 1,000."""
    if value is None:
        return missing
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_pct(value: Any, missing: str = "-") -> str:
    """A share in [0, 1] as a percentage with one decimal."""
    return missing if value is None else f"{100 * float(value):.1f}%"


def render(insights: dict[str, Any], console: Console) -> None:
    """Print the insights as rich tables."""
    if not insights.get("enabled", False):
        console.print("Insights are off on this router (insights.enabled: false).")
        return
    console.print(_shape_table(insights.get("shape") or {}))
    console.print(_versions_table(insights.get("versions") or []))
    savings = insights.get("savings") or {}
    console.print(_savings_table(savings))
    console.print(_break_even_table(savings))
    for entry in (insights.get("shape") or {}).get("routes") or []:
        if entry.get("advice"):
            line = Text(f"{entry['route']}", style="bold")
            line.append(f" ({entry['tenant']}): {entry['advice']}", style="")
            console.print(line)


def _shape_table(shape: dict[str, Any]) -> Table:
    flagged = shape.get("flagged_routes") or []
    title = "Prompt shape: " + (f"flagged {', '.join(flagged)}" if flagged else "no route flagged")
    table = Table(title=Text(title))
    for name in (
        "route", "tenant", "flagged", "samples", "shared prefix", "divergence",
        "stable after", "varying head (redacted)", "saved/req",
    ):  # fmt: skip
        table.add_column(name, overflow="fold")
    for e in shape.get("routes") or []:
        divergence = e.get("divergence")
        where = (
            f"block {divergence['block']}, token ~{divergence['token_offset']}"
            if divergence
            else "-"
        )
        table.add_row(
            _text(e.get("route")),
            _text(e.get("tenant")),
            Text("yes", style="bold red") if e.get("flagged") else Text("no"),
            format_scalar(e.get("samples")),
            format_scalar(e.get("chained_tokens")),
            where,
            format_scalar(e.get("stable_tokens_after_divergence")),
            _text(e.get("varying_head_shape")),
            format_scalar(e.get("savings_tokens_per_request")),
        )
    return table


def _versions_table(versions: list[dict[str, Any]]) -> Table:
    table = Table(title="Prefix versions")
    for name in (
        "route", "version", "state", "requests", "cached tokens", "hit rate",
        "warmup requests", "warmup missed", "hit rate after warmup",
    ):  # fmt: skip
        table.add_column(name)
    for v in versions:
        warmup = v.get("warmup") or {}
        table.add_row(
            _text(v.get("route")),
            _text(v.get("version")),
            _text(v.get("state")),
            format_scalar(v.get("requests")),
            format_scalar(v.get("cached_tokens")),
            format_pct(v.get("hit_rate")),
            format_scalar(warmup.get("requests")),
            format_scalar(warmup.get("missed_tokens")),
            format_pct(v.get("hit_rate_after_warmup")),
        )
    return table


def _savings_table(savings: dict[str, Any]) -> Table:
    prefill = savings.get("prefill") or {}
    source = prefill.get("source")
    title = "Savings" + (
        f" (prefill {format_scalar(prefill.get('tokens_per_s'))} tokens/s, {source})"
        if source
        else ""
    )
    table = Table(title=title)
    for name in (
        "route", "tenant", "requests", "prompt tokens", "cached (prefill saved)", "hit rate",
        "TTFT hits ms", "TTFT misses ms", "GPU-s saved", "saved",
    ):  # fmt: skip
        table.add_column(name)
    rows = list(savings.get("rows") or [])
    totals = savings.get("totals")
    if totals:
        rows.append({"route": "total", "tenant": "", **totals})
    for r in rows:
        ttft = r.get("ttft_ms") or {}
        money = r.get("money")
        table.add_row(
            _text(r.get("route")),
            _text(r.get("tenant")),
            format_scalar(r.get("requests")),
            format_scalar(r.get("prompt_tokens")),
            format_scalar(r.get("cached_tokens")),
            format_pct(r.get("hit_rate")),
            format_scalar(ttft.get("hits")),
            format_scalar(ttft.get("misses")),
            format_scalar(r.get("gpu_seconds_saved")),
            f"{money['saved']:,.4f} {money['currency']}" if money else "-",
        )
    return table


def _break_even_table(savings: dict[str, Any]) -> Table:
    read = (savings.get("pricing") or {}).get("cached_read_multiplier")
    table = Table(title=f"Break-even of a cache-write premium (reads at {format_scalar(read)}x)")
    for name in ("write price", "reads to repay", "observed reads/written token", "repaid"):
        table.add_column(name)
    for b in savings.get("break_even") or []:
        configured = " (configured)" if b.get("configured") else ""
        table.add_row(
            f"{format_scalar(b.get('write_multiplier'))}x{configured}",
            format_scalar(b.get("reuses_needed")),
            format_scalar(b.get("observed_reads_per_written_token")),
            format_scalar(b.get("repaid")),
        )
    return table
