"""The savings report: what the prefix cache is worth, in tokens, GPU time and money.

Everything comes from the usage the workers report on each answer (``usage.prompt_tokens``,
``usage.prompt_tokens_details.cached_tokens``) and the time to first token the router
measures on streams, summed per route and tenant group, so the report adds up exactly to the
raw usage:

- **prefill tokens saved** = cached tokens: the worker did not compute them again;
- **TTFT of hits and misses**: streamed answers with some cached tokens (a hit) against none
  (a miss), the measured difference a hit makes;
- **GPU-seconds saved** = cached tokens / prefill throughput: the configured
  ``prefill_tokens_per_s``, or else the throughput measured from the router's own TTFTs (the
  least-squares slope of TTFT against uncached prompt tokens over every streamed answer);
- **money** at the configured input price: with a read discount only (cached tokens cost
  ``cached_read_multiplier`` of the price: OpenAI's model), and with a write premium too
  (every uncached token written at ``cache_write_multiplier`` times the price: Anthropic's
  model with automatic caching, an upper bound on the premium);
- **break-even**: a token written at premium ``w`` and read at ``r`` repays the premium after
  ``(w - 1) / (1 - r)`` reads (1.25x and 0.1x: one read; 2x: two). The report sets that
  against the observed reads per written token (cached / uncached tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

STANDARD_WRITE_MULTIPLIERS = (1.25, 2.0)
"""Cache-write premiums of the common 5-minute and 1-hour tiers, always shown beside the
configured one."""


@dataclass(frozen=True, slots=True)
class Pricing:
    input_price_per_mtok: float | None
    cached_read_multiplier: float = 0.1
    cache_write_multiplier: float = 1.25
    currency: str = "USD"
    prefill_tokens_per_s: float | None = None


@dataclass(slots=True)
class Ledger:
    """Sums for one route and tenant group."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    without_details: int = 0
    """Answers whose usage had no ``prompt_tokens_details`` (counted as 0 cached)."""
    hits: int = 0
    streamed_hits: int = 0
    ttft_hits_s: float = 0.0
    streamed_misses: int = 0
    ttft_misses_s: float = 0.0

    def add(self, other: Ledger) -> None:
        for name in Ledger.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(slots=True)
class _Fit:
    """Running sums for the least-squares line TTFT = a + b * uncached tokens."""

    n: int = 0
    x: float = 0.0
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0

    def add(self, uncached: int, ttft: float) -> None:
        self.n += 1
        self.x += uncached
        self.y += ttft
        self.xx += uncached * uncached
        self.xy += uncached * ttft

    def slope(self) -> float | None:
        """Seconds per uncached token, or None without enough spread to tell."""
        if self.n < 3:
            return None
        spread = self.n * self.xx - self.x * self.x
        if spread <= 1e-9 * max(1.0, self.xx):
            return None
        return max(0.0, (self.n * self.xy - self.x * self.y) / spread)


class SavingsBook:
    def __init__(self) -> None:
        self._ledgers: dict[tuple[str, str], Ledger] = {}
        self._fit = _Fit()

    def observe(
        self, route: str, tenant: str, prompt: int, cached: int | None, ttft: float | None
    ) -> None:
        ledger = self._ledgers.get((route, tenant))
        if ledger is None:
            ledger = self._ledgers[(route, tenant)] = Ledger()
        if cached is None:
            ledger.without_details += 1
            cached = 0
        ledger.requests += 1
        ledger.prompt_tokens += prompt
        ledger.cached_tokens += cached
        hit = cached > 0
        ledger.hits += hit
        if ttft is not None:
            if hit:
                ledger.streamed_hits += 1
                ledger.ttft_hits_s += ttft
            else:
                ledger.streamed_misses += 1
                ledger.ttft_misses_s += ttft
            self._fit.add(prompt - cached, ttft)

    def seconds_per_token(self, pricing: Pricing) -> tuple[float | None, str | None]:
        """Prefill seconds per token and where the figure comes from."""
        if pricing.prefill_tokens_per_s:
            return 1.0 / pricing.prefill_tokens_per_s, "configured"
        slope = self._fit.slope()
        return (slope, "measured") if slope is not None else (None, None)

    def report(self, pricing: Pricing) -> dict[str, Any]:
        per_token, source = self.seconds_per_token(pricing)
        rows = []
        totals = Ledger()
        for (route, tenant), ledger in sorted(self._ledgers.items()):
            totals.add(ledger)
            rows.append({"route": route, "tenant": tenant, **_figures(ledger, pricing, per_token)})
        return {
            "rows": rows,
            "totals": _figures(totals, pricing, per_token),
            "prefill": {
                "source": source,
                "seconds_per_token": per_token,
                "tokens_per_s": round(1 / per_token, 1) if per_token else None,
                "streamed_answers_fitted": self._fit.n,
            },
            "pricing": {
                "currency": pricing.currency,
                "input_price_per_mtok": pricing.input_price_per_mtok,
                "cached_read_multiplier": pricing.cached_read_multiplier,
                "cache_write_multiplier": pricing.cache_write_multiplier,
            },
            "break_even": break_even(totals, pricing),
        }


def reads_to_repay(write_multiplier: float, read_multiplier: float) -> float | None:
    """Reads of a cached token that repay its write premium (None: never, reads cost full)."""
    if write_multiplier <= 1.0:
        return 0.0
    if read_multiplier >= 1.0:
        return None
    return (write_multiplier - 1.0) / (1.0 - read_multiplier)


def break_even(totals: Ledger, pricing: Pricing) -> list[dict[str, Any]]:
    uncached = totals.prompt_tokens - totals.cached_tokens
    observed = round(totals.cached_tokens / uncached, 3) if uncached > 0 else None
    tiers = sorted({pricing.cache_write_multiplier, *STANDARD_WRITE_MULTIPLIERS})
    rows = []
    for write in tiers:
        needed = reads_to_repay(write, pricing.cached_read_multiplier)
        rows.append(
            {
                "write_multiplier": write,
                "configured": write == pricing.cache_write_multiplier,
                "reads_to_repay": needed,
                "reuses_needed": None if needed is None else math.ceil(needed - 1e-9),
                "observed_reads_per_written_token": None
                if observed is None
                else round(observed, 3),
                "repaid": None if needed is None or observed is None else observed >= needed,
            }
        )
    return rows


def _mean_ms(total_s: float, count: int) -> float | None:
    return round(1000 * total_s / count, 2) if count else None


def _figures(ledger: Ledger, pricing: Pricing, per_token: float | None) -> dict[str, Any]:
    prompt, cached = ledger.prompt_tokens, ledger.cached_tokens
    uncached = prompt - cached
    hit_ms = _mean_ms(ledger.ttft_hits_s, ledger.streamed_hits)
    miss_ms = _mean_ms(ledger.ttft_misses_s, ledger.streamed_misses)
    figures: dict[str, Any] = {
        "requests": ledger.requests,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "uncached_tokens": uncached,
        "prefill_tokens_saved": cached,
        "hit_rate": round(cached / prompt, 4) if prompt else None,
        "hits": ledger.hits,
        "misses": ledger.requests - ledger.hits,
        "without_details": ledger.without_details,
        "ttft_ms": {
            "hits": hit_ms,
            "misses": miss_ms,
            "difference": None if hit_ms is None or miss_ms is None else round(miss_ms - hit_ms, 2),
            "streamed_hits": ledger.streamed_hits,
            "streamed_misses": ledger.streamed_misses,
        },
        "gpu_seconds_saved": None if per_token is None else round(cached * per_token, 4),
        "money": _money(prompt, cached, pricing),
    }
    return figures


def _money(prompt: int, cached: int, pricing: Pricing) -> dict[str, Any] | None:
    if pricing.input_price_per_mtok is None:
        return None
    unit = pricing.input_price_per_mtok / 1_000_000
    read, write = pricing.cached_read_multiplier, pricing.cache_write_multiplier
    uncached = prompt - cached
    without_cache = prompt * unit
    with_reads = (uncached + cached * read) * unit
    with_writes = (uncached * write + cached * read) * unit
    return {
        "currency": pricing.currency,
        "cost_without_cache": round(without_cache, 6),
        "cost_with_cache": round(with_reads, 6),
        "saved": round(without_cache - with_reads, 6),
        "cost_with_write_premium": round(with_writes, 6),
        "saved_with_write_premium": round(without_cache - with_writes, 6),
    }
