"""One tenant cannot learn whether another tenant sent a given prefix (approximate mode).

Two simulated workers (their cost model makes a prefix-cache hit clearly faster than a miss)
behind the router in-process, with two authenticated tenants. Tenant A's secret prefixes are
made warm for A on *every* worker (through the router, so its warm index knows them, and
directly on each worker with A's salt, so wherever B lands A's blocks are there). Then B sends
the same text, and variations of it, and fresh text of the same length as a control:

- the measurement can see a leak: A's own repeat is several times faster than a cold prompt
  and reports cached tokens (so a cache shared across tenants would show);
- B gets ``cached_tokens == 0`` for A's prefix, whatever worker it lands on, even when B sends
  A's exact salt in ``cache_salt`` or A's name in a tenant header;
- B's ``x-prefix-router-decision`` shows ``matched=0; best=0`` (the index is tenant-scoped);
- B's time for A's prefix is indistinguishable from its time for a never-sent prefix: the
  medians of a few dozen samples each, taken in alternating order, differ by less than a
  quarter of the effect a leak produces.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.integration.conftest import (  # the fixtures are used by name
    RouterFactory,
    Sim,
    SimFactory,
    router,  # noqa: F401
    settings_for,
    sims,  # noqa: F401
)

KEYS = {"tenant-a": "sk-tenant-a", "tenant-b": "sk-tenant-b"}
SAMPLES = 24
PREFIX_CHARS = 6000
"""About 1,500 simulated tokens: ~75 ms of prefill at 50 us per token, ~0 when cached."""
WORDS = (
    "ledger invoice parcel hub route tariff quota vendor audit freight customs pallet "
    "manifest carrier depot dispatch ticket refund policy region season margin forecast"
).split()


@dataclass(frozen=True, slots=True)
class Answer:
    seconds: float
    cached_tokens: int
    prompt_tokens: int
    worker: str
    decision: str


def prose(rng: random.Random, chars: int) -> str:
    """Random words (never repeated across calls in practice: 23^~800 possibilities)."""
    words: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:chars]


def body(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "messages": [
            {"role": "system", "content": text},
            {"role": "user", "content": "Summarise."},
        ],
        "max_tokens": 1,
        **extra,
    }


async def ask(
    client: httpx.AsyncClient, tenant: str, payload: dict[str, Any], **headers: str
) -> Answer:
    started = time.perf_counter()
    resp = await client.post(
        "/v1/chat/completions",
        json=payload,
        headers={"authorization": f"Bearer {KEYS[tenant]}", **headers},
    )
    seconds = time.perf_counter() - started
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    return Answer(
        seconds,
        int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
        int(usage["prompt_tokens"]),
        resp.headers["x-prefix-router-worker"],
        resp.headers["x-prefix-router-decision"],
    )


@dataclass
class Setup:
    client: httpx.AsyncClient
    sims: list[Sim]
    salt_a: str


@pytest.fixture
async def setup(sims: SimFactory, router: RouterFactory) -> AsyncIterator[Setup]:  # noqa: F811
    workers = sims(2, prefill_us_per_token=50, decode_ms_per_token=0.5, cache_blocks=16384)
    settings = settings_for(
        workers,
        tenants={
            "salt_secret": "cross-tenant-secret",
            "api_keys": [{"tenant": t, "key": k} for t, k in KEYS.items()],
        },
    )
    running = await router(settings)
    async with httpx.AsyncClient(base_url=running.url, timeout=30, trust_env=False) as client:
        yield Setup(client, workers, running.state.tenants.cache_salt("tenant-a"))


async def warm_everywhere(setup: Setup, text: str, **extra: Any) -> None:
    """A's prefix warm for A through the router (index) and on every worker (A's salt)."""
    first = await ask(setup.client, "tenant-a", body(text, **extra))
    assert first.cached_tokens == 0
    async with httpx.AsyncClient(timeout=30, trust_env=False) as direct:
        for sim in setup.sims:
            resp = await direct.post(
                sim.url + "/v1/chat/completions", json=body(text, cache_salt=setup.salt_a)
            )
            assert resp.status_code == 200, resp.text


def indistinguishable(times: list[float], control: list[float], effect: float) -> bool:
    """Medians closer than a quarter of the effect a cache hit has (robust to outliers)."""
    return abs(statistics.median(times) - statistics.median(control)) < effect / 4


def decision_fields(header: str) -> dict[str, str]:
    parts = [p.strip() for p in header.split(";")]
    return dict(p.split("=", 1) for p in parts[1:]) | {"reason": parts[0]}


async def test_the_measurement_sees_a_cache_hit(setup: Setup) -> None:
    """A tenant's own repeat of a long prefix is much faster than a cold one and reports
    cached tokens: the timing and usage this file relies on would expose a shared cache."""
    rng = random.Random(1)
    cold, warm = [], []
    for _ in range(SAMPLES // 2):
        text = prose(rng, PREFIX_CHARS)
        first = await ask(setup.client, "tenant-a", body(text))
        again = await ask(setup.client, "tenant-a", body(text))
        assert first.cached_tokens == 0
        assert again.cached_tokens >= 0.9 * again.prompt_tokens
        assert decision_fields(again.decision)["reason"] == "warm"
        cold.append(first.seconds)
        warm.append(again.seconds)
    assert statistics.median(warm) * 3 < statistics.median(cold), (cold, warm)


async def test_tenant_b_learns_nothing_from_cached_tokens_or_decisions(setup: Setup) -> None:
    """Whatever B sends (A's exact text, with another tail, with A's salt in cache_salt, with
    A's name in a tenant header), B's usage says 0 cached tokens and the router's decision
    header says no warm block anywhere, while A's own repeat still hits."""
    rng = random.Random(2)
    # Each variation on a text B has never sent: B's own cache must not be what answers.
    variations: list[tuple[str, str, dict[str, Any], dict[str, str]]] = []
    for _ in range(2):
        for name, extra, headers in (
            ("exact", {}, {}),
            ("other tail", {"suffix": " and one more clause"}, {}),
            ("A's salt", {"cache_salt": setup.salt_a}, {}),
            ("A's name in a header", {}, {"x-tenant-id": "tenant-a"}),
            ("a prompt_cache_key", {"prompt_cache_key": "shared-key"}, {}),
        ):
            text = prose(rng, PREFIX_CHARS)
            # With a prompt_cache_key, A uses the same key B then sends.
            await warm_everywhere(
                setup, text, **{k: v for k, v in extra.items() if k == "prompt_cache_key"}
            )
            fields = dict(extra)
            sent = text + str(fields.pop("suffix", ""))
            variations.append((name, text, body(sent, **fields), headers))
    for name, _, payload, headers in variations:
        answer = await ask(setup.client, "tenant-b", payload, **headers)
        fields = decision_fields(answer.decision)
        assert answer.cached_tokens == 0, (name, answer)
        assert (fields["matched"], fields["best"]) == ("0", "0"), (name, answer.decision)
        assert fields["reason"] != "warm"
    for _, text, _, _ in variations:  # A's blocks were still cached on the workers all along
        assert (await ask(setup.client, "tenant-a", body(text))).cached_tokens > 0


async def test_tenant_b_learns_nothing_from_time_to_first_token(setup: Setup) -> None:
    """B's time for a prefix A has warmed everywhere is statistically the same as for a
    never-sent prefix of the same length (medians of 24 samples each, alternating order),
    while a leak would make it several times faster."""
    rng = random.Random(3)
    secret_times, control_times, own_repeat = [], [], []
    for i in range(SAMPLES):
        secret, control = prose(rng, PREFIX_CHARS), prose(rng, PREFIX_CHARS)
        await warm_everywhere(setup, secret)
        own_repeat.append((await ask(setup.client, "tenant-a", body(secret))).seconds)
        order = [("secret", secret), ("control", control)]
        if i % 2:
            order.reverse()
        for kind, text in order:
            answer = await ask(setup.client, "tenant-b", body(text))
            assert answer.cached_tokens == 0
            (secret_times if kind == "secret" else control_times).append(answer.seconds)
    secret_median = statistics.median(secret_times)
    control_median = statistics.median(control_times)
    leak_effect = control_median - statistics.median(own_repeat)
    assert leak_effect > 0.03, "the cost model must make a hit clearly faster"
    # The comparison has the power to see a leak: applied to A's own (cached) repeats it fails.
    assert not indistinguishable(own_repeat, control_times, leak_effect)
    assert indistinguishable(secret_times, control_times, leak_effect), (
        secret_median,
        control_median,
        leak_effect,
    )
    # And not merely the medians: B's fastest answers for A's prefixes are no faster than a
    # cold prefill (a single leaked hit would be a large outlier downwards).
    assert min(secret_times) > statistics.median(own_repeat) + leak_effect / 2
