"""Seeded workload generator and the JSON-lines trace format.

A trace is the list of requests a load test sends: when (offset from the start), as whom
(tenant, API key), where (path) and what (the JSON body), plus the labels the report groups
by (conversation, turn, prefix version). The generator is a pure function of its config:
the same seed gives the same trace, byte for byte, so two policies (or two routers) can be
driven by exactly the same requests, and an offline replay can run the trace without a
network.

Model of the traffic:
- arrivals are Poisson at ``rate``, with occasional bursts (``burst_factor`` times the rate
  for ``burst_length`` seconds, bursts themselves Poisson every ``burst_every`` s on average);
- the tenant of each arrival is drawn from a Zipf popularity over the tenants;
- a tenant's request continues one of its open conversations (the history grows by the
  previous assistant answer and a new user message) or starts a new one;
- now and then a tenant's prefix version changes: new conversations use the new head, which
  shares the old head's text up to a cut and differs after it.

Trace file: the first line is a header ``{"format": "prefix-router-trace", "version": 1,
"meta": {...}}``, then one request object per line. A ``.gz`` suffix means gzip.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from load_tests.jsonl import open_text
from load_tests.tenants import (
    Head,
    assistant_reply,
    build_head,
    make_tenants,
    user_tail,
    zipf_weights,
)

TRACE_FORMAT = "prefix-router-trace"
TRACE_VERSION = 1
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    """Everything that shapes a trace. Same config, same trace."""

    seed: int = 0
    tenants: int = 32
    zipf_exponent: float = 1.0
    head_tokens: tuple[int, int] = (1500, 3000)
    """Range of head sizes in tokens; each tenant draws its size from it."""
    rate: float = 20.0
    """Mean arrivals per second outside bursts."""
    duration: float = 30.0
    """Arrivals are generated for offsets in [0, duration)."""
    max_requests: int | None = None
    burst_every: float = 12.0
    """Mean seconds between bursts (0 disables bursts)."""
    burst_length: float = 1.5
    burst_factor: float = 3.0
    version_every: float = 20.0
    """Mean seconds between prefix-version changes, over all tenants (0 disables them)."""
    continue_probability: float = 0.6
    """Chance that a tenant's request continues an open conversation rather than starting one."""
    open_conversations: int = 4
    """Open conversations kept per tenant; the oldest is dropped when a new one starts."""
    max_turns: int = 8
    stream_fraction: float = 0.5
    completions_fraction: float = 0.1
    """Share of requests sent to /v1/completions (single-shot, head text plus a question)."""
    max_tokens: tuple[int, int] = (8, 48)
    model: str = "sim-model"
    api_key_prefix: str = "sk-demo-"
    text_groups: int = 0
    """When > 0, tenants share prompt text in this many groups (tenant i writes group
    ``i % text_groups``'s heads): different tenants sending identical text."""
    client_salt: bool = False
    """Every body carries ``cache_salt`` = the tenant's id, as a tenant-aware client would
    set it (the router replaces it with its own; peer routers pass it through)."""
    rollout_at: float | None = None
    """At this offset every tenant moves to its next prefix version at once (a rollout)."""
    version_header: str | None = None
    """Send each request's prefix version in this header (e.g. ``x-prefix-version``)."""

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.duration <= 0:
            raise ValueError("rate and duration must be positive")
        if self.tenants < 1 or self.max_turns < 1 or self.open_conversations < 1:
            raise ValueError("tenants, max_turns and open_conversations must be >= 1")
        if self.text_groups < 0:
            raise ValueError("text_groups must be >= 0")
        for name in ("continue_probability", "stream_fraction", "completions_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace, ready to send."""

    index: int
    offset: float
    """Seconds from the start of the run at which to send it."""
    tenant: str
    api_key: str
    path: str
    body: dict[str, Any]
    stream: bool
    conversation: str | None
    """Conversation id (None for single-shot completions)."""
    turn: int
    """1 for a conversation's first request; 0 for single-shot completions."""
    prefix_version: int
    headers: dict[str, str] = field(default_factory=dict)
    """Extra request headers (route, prefix version) the client sends with it."""

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "index": self.index,
            "offset": self.offset,
            "tenant": self.tenant,
            "api_key": self.api_key,
            "path": self.path,
            "stream": self.stream,
            "conversation": self.conversation,
            "turn": self.turn,
            "prefix_version": self.prefix_version,
            "body": self.body,
        }
        if self.headers:
            obj["headers"] = self.headers
        return obj

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TraceRequest:
        return cls(
            index=int(obj["index"]),
            offset=float(obj["offset"]),
            tenant=str(obj["tenant"]),
            api_key=str(obj["api_key"]),
            path=str(obj["path"]),
            body=dict(obj["body"]),
            stream=bool(obj["stream"]),
            conversation=obj.get("conversation"),
            turn=int(obj["turn"]),
            prefix_version=int(obj["prefix_version"]),
            headers={str(k): str(v) for k, v in (obj.get("headers") or {}).items()},
        )


@dataclass(slots=True)
class Trace:
    """A trace: metadata (what generated it) and its requests in offset order."""

    meta: dict[str, Any]
    requests: list[TraceRequest] = field(default_factory=list)

    @property
    def tenants(self) -> dict[str, str]:
        """tenant id -> API key, for every tenant that appears in the trace."""
        return {r.tenant: r.api_key for r in self.requests}


@dataclass(slots=True)
class _Conversation:
    id: str
    version: int
    messages: list[dict[str, str]]
    turns: int


def arrival_offsets(config: WorkloadConfig, rng: random.Random) -> Iterator[float]:
    """Poisson arrivals at ``rate``, raised to ``rate * burst_factor`` inside bursts.

    Sampled by thinning a Poisson process at the peak rate, so bursts need no special case.
    """
    bursts: list[tuple[float, float]] = []
    if config.burst_every > 0 and config.burst_factor > 1:
        t = 0.0
        while True:
            t += rng.expovariate(1.0 / config.burst_every)
            if t >= config.duration:
                break
            bursts.append((t, t + config.burst_length))
    starts = [b[0] for b in bursts]
    peak = config.rate * max(1.0, config.burst_factor if bursts else 1.0)
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= config.duration:
            return
        i = bisect.bisect_right(starts, t) - 1
        in_burst = i >= 0 and t < bursts[i][1]
        rate = config.rate * config.burst_factor if in_burst else config.rate
        if rng.random() * peak < rate:
            yield t


class WorkloadGenerator:
    """Builds a trace from a `WorkloadConfig`. One instance per trace (it holds the state of
    open conversations and prefix versions while it runs)."""

    def __init__(self, config: WorkloadConfig) -> None:
        self.config = config
        self.tenants = make_tenants(
            config.tenants,
            seed=config.seed,
            head_tokens=config.head_tokens,
            key_prefix=config.api_key_prefix,
            text_groups=config.text_groups,
        )
        weights = zipf_weights(config.tenants, config.zipf_exponent)
        self._cum_weights = list(itertools.accumulate(weights))
        # Separate streams so that, e.g., a different rate does not change the text.
        seed = config.seed
        self._arrival_rng = random.Random(f"{seed}|arrivals")
        self._pick_rng = random.Random(f"{seed}|picks")
        self._text_rng = random.Random(f"{seed}|text")
        self._version_rng = random.Random(f"{seed}|versions")
        self._versions = [0] * config.tenants
        self._heads: dict[tuple[int, int], Head] = {}
        self._open: list[list[_Conversation]] = [[] for _ in range(config.tenants)]
        self._started = [0] * config.tenants
        self._next_version_change = self._draw_version_gap(0.0)
        self._rolled_out = config.rollout_at is None

    def head(self, tenant_index: int, version: int) -> Head:
        key = (tenant_index, version)
        if key not in self._heads:
            self._heads[key] = build_head(self.tenants[tenant_index], version)
        return self._heads[key]

    def _draw_version_gap(self, now: float) -> float:
        if self.config.version_every <= 0:
            return float("inf")
        return now + self._version_rng.expovariate(1.0 / self.config.version_every)

    def _advance_versions(self, now: float) -> None:
        if not self._rolled_out and now >= (self.config.rollout_at or 0.0):
            self._rolled_out = True
            self._versions = [v + 1 for v in self._versions]
        while self._next_version_change <= now:
            tenant = self._version_rng.randrange(self.config.tenants)
            self._versions[tenant] += 1
            self._next_version_change = self._draw_version_gap(self._next_version_change)

    def _pick_tenant(self) -> int:
        x = self._pick_rng.random() * self._cum_weights[-1]
        return min(bisect.bisect_right(self._cum_weights, x), self.config.tenants - 1)

    def _conversation_for(self, t: int) -> tuple[_Conversation, bool]:
        """An open conversation of tenant ``t`` to continue, or a new one (second item)."""
        open_ = self._open[t]
        if open_ and self._pick_rng.random() < self.config.continue_probability:
            return open_[self._pick_rng.randrange(len(open_))], False
        version = self._versions[t]
        self._started[t] += 1
        conv = _Conversation(
            id=f"{self.tenants[t].id}-c{self._started[t]:04d}",
            version=version,
            messages=self.head(t, version).messages(),
            turns=0,
        )
        open_.append(conv)
        if len(open_) > self.config.open_conversations:
            open_.pop(0)
        return conv, True

    def _chat_body(self, conv: _Conversation, stream: bool, max_tokens: int) -> dict[str, Any]:
        if conv.turns > 0:
            conv.messages.append({"role": "assistant", "content": assistant_reply(self._text_rng)})
        conv.messages.append({"role": "user", "content": user_tail(self._text_rng)})
        conv.turns += 1
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": [dict(m) for m in conv.messages],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def _extras(self, tenant: str, body: dict[str, Any], version: int) -> dict[str, str]:
        """Applies the salt option to ``body``; returns the request's extra headers."""
        if self.config.client_salt:
            body["cache_salt"] = tenant
        if self.config.version_header:
            return {self.config.version_header: f"v{version}"}
        return {}

    def __iter__(self) -> Iterator[TraceRequest]:
        cfg = self.config
        limit = cfg.max_requests if cfg.max_requests is not None else float("inf")
        for index, offset in enumerate(arrival_offsets(cfg, self._arrival_rng)):
            if index >= limit:
                return
            self._advance_versions(offset)
            t = self._pick_tenant()
            tenant = self.tenants[t]
            stream = self._pick_rng.random() < cfg.stream_fraction
            max_tokens = self._pick_rng.randint(*cfg.max_tokens)
            if self._pick_rng.random() < cfg.completions_fraction:
                version = self._versions[t]
                prompt = self.head(t, version).text() + "\n\nQ: " + user_tail(self._text_rng)
                body: dict[str, Any] = {
                    "model": cfg.model,
                    "prompt": prompt + "\nA:",
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                    "stream": stream,
                }
                if stream:
                    body["stream_options"] = {"include_usage": True}
                headers = self._extras(tenant.id, body, version)
                yield TraceRequest(
                    index, round(offset, 6), tenant.id, tenant.api_key, COMPLETIONS_PATH,
                    body, stream, None, 0, version, headers,
                )  # fmt: skip
                continue
            conv, _ = self._conversation_for(t)
            body = self._chat_body(conv, stream, max_tokens)
            if conv.turns >= cfg.max_turns:
                self._open[t].remove(conv)
            headers = self._extras(tenant.id, body, conv.version)
            yield TraceRequest(
                index, round(offset, 6), tenant.id, tenant.api_key, CHAT_PATH,
                body, stream, conv.id, conv.turns, conv.version, headers,
            )  # fmt: skip


def generate_trace(config: WorkloadConfig) -> Trace:
    """The whole trace for ``config`` in memory (use `WorkloadGenerator` to stream it)."""
    generator = WorkloadGenerator(config)
    requests = list(generator)
    meta = {
        "generator": "load_tests.workload",
        "config": config.to_json(),
        "requests": len(requests),
        "tenants": {t.id: {"head_tokens": t.head_tokens} for t in generator.tenants},
    }
    # Through JSON once, so the meta compares equal after a write/read round trip.
    return Trace(json.loads(json.dumps(meta)), requests)


def write_trace(path: Path | str, trace: Trace) -> Path:
    """Write ``trace`` as JSON lines (gzip if the name ends in ``.gz``)."""
    path = Path(path)
    with open_text(path, "w") as out:
        header = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "meta": trace.meta}
        out.write(json.dumps(header, separators=(",", ":")) + "\n")
        for request in trace.requests:
            out.write(json.dumps(request.to_json(), separators=(",", ":")) + "\n")
    return path


def read_trace(path: Path | str) -> Trace:
    """Read a trace written by `write_trace` (a file without a header line is accepted)."""
    path = Path(path)
    meta: dict[str, Any] = {}
    requests: list[TraceRequest] = []
    with open_text(path, "r") as src:
        for number, line in enumerate(src, start=1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if obj.get("format") == TRACE_FORMAT:
                if obj.get("version") != TRACE_VERSION:
                    raise ValueError(f"{path}: unsupported trace version {obj.get('version')}")
                meta = dict(obj.get("meta") or {})
                continue
            try:
                requests.append(TraceRequest.from_json(obj))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: bad trace line: {exc}") from exc
    return Trace(meta, requests)


def summarize_trace(requests: Sequence[TraceRequest]) -> dict[str, Any]:
    """Counts a report prints about what was sent (by tenant, path, stream)."""
    by_tenant: dict[str, int] = {}
    for r in requests:
        by_tenant[r.tenant] = by_tenant.get(r.tenant, 0) + 1
    return {
        "requests": len(requests),
        "tenants": len(by_tenant),
        "by_tenant": dict(sorted(by_tenant.items())),
        "streaming": sum(r.stream for r in requests),
        "completions": sum(r.path == COMPLETIONS_PATH for r in requests),
        "conversations": len({r.conversation for r in requests if r.conversation}),
        "span_s": round(requests[-1].offset, 3) if requests else 0.0,
    }
