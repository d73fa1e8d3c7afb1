"""Prompt-shape scenarios: routes with a good and a bad prompt shape, and a prefix rollout.

The prompt-shape advisor (docs/insights.md) must flag a route whose requests put something
request-specific (an id, a timestamp) *before* a long stable head, and must leave alone a
route that puts the same kind of head first. This module builds such a trace, seeded:

- every route has its own tenant(s) and a stable head of about ``head_tokens`` tokens (the
  synthetic heads of `load_tests.tenants`);
- each request carries a per-request line, ``Request 7F3A-00012345 at 2026-05-12T10:00:03Z.``;
- on the routes in ``bad_routes`` that line comes first, before the head, while
  ``id_position`` is ``"start"``; with ``"end"`` (the rerun that shows what a reordering
  achieves) it moves after the head, into the user message, as on every other route;
- the request ends with a short question (request-specific state, last);
- on the routes in ``rollout_routes`` the head changes version at ``rollout_at`` (a share of
  that route's requests): a banner naming the version opens the head, and the head's text
  is the next version of `load_tests.tenants`. Every request names its version in the
  ``version_header`` (``v1``, ``v2``), every request its route in the ``route_header``.

Requests go round robin over the routes at ``rate`` per second; all are single-shot chats
(streamed when ``stream``, so the router measures TTFT).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Literal

from load_tests.tenants import Tenant, build_head, make_tenants, sentence
from load_tests.workload import CHAT_PATH, Trace, TraceRequest

IdPosition = Literal["start", "end"]


@dataclass(frozen=True, slots=True)
class ShapeConfig:
    """Everything that shapes a prompt-shape trace. Same config, same trace."""

    seed: int = 0
    requests: int = 60
    """Requests in all, spread round robin over the routes."""
    routes: tuple[str, ...] = ("bad", "good")
    bad_routes: tuple[str, ...] = ("bad",)
    """Routes that put the per-request line before the head (with ``id_position="start"``)."""
    id_position: IdPosition = "start"
    head_tokens: int = 2000
    tenants_per_route: int = 1
    rollout_routes: tuple[str, ...] = ()
    """Routes whose head moves from ``v1`` to ``v2`` mid-run."""
    rollout_at: float = 0.5
    """Share of a rollout route's requests sent with ``v1`` before the switch."""
    rate: float = 20.0
    stream: bool = True
    max_tokens: int = 4
    model: str = "sim-model"
    route_header: str = "x-prefix-router-route"
    version_header: str = "x-prefix-version"
    api_key_prefix: str = "sk-shape-"

    def __post_init__(self) -> None:
        if self.requests < 1 or not self.routes or self.tenants_per_route < 1:
            raise ValueError("need at least one request, one route and one tenant per route")
        if self.rate <= 0 or self.head_tokens < 1:
            raise ValueError("rate and head_tokens must be positive")
        if not 0.0 < self.rollout_at < 1.0:
            raise ValueError("rollout_at must be in (0, 1)")
        unknown = (set(self.bad_routes) | set(self.rollout_routes)) - set(self.routes)
        if unknown:
            raise ValueError(f"bad_routes/rollout_routes name unknown routes {sorted(unknown)}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def request_line(rng: random.Random, index: int, offset: float) -> str:
    """The per-request line: an id and a timestamp, different on every request."""
    seconds = int(offset)
    stamp = f"2026-05-12T10:{seconds // 60 % 60:02d}:{seconds % 60:02d}Z"
    return f"Request {rng.randrange(16**4):04X}-{index:08d} at {stamp}."


def _head_text(tenant: Tenant, version: int, versioned: bool) -> str:
    head = build_head(tenant, version - 1).text()
    if not versioned:
        return head
    return f"Prompt policy v{version}, effective for every answer below.\n\n{head}"


def shape_trace(config: ShapeConfig) -> Trace:
    """The trace for ``config`` (see the module docstring)."""
    count = len(config.routes) * config.tenants_per_route
    tenants = make_tenants(
        count,
        seed=config.seed,
        head_tokens=(config.head_tokens, config.head_tokens),
        key_prefix=config.api_key_prefix,
    )
    rng = random.Random(f"{config.seed}|shapes")
    per_route = {route: 0 for route in config.routes}
    totals = {
        route: len(range(i, config.requests, len(config.routes)))
        for i, route in enumerate(config.routes)
    }
    heads: dict[tuple[str, int], str] = {}
    requests: list[TraceRequest] = []
    for index in range(config.requests):
        route_index = index % len(config.routes)
        route = config.routes[route_index]
        seen = per_route[route]
        per_route[route] += 1
        tenant = tenants[route_index * config.tenants_per_route + seen % config.tenants_per_route]
        rollout = route in config.rollout_routes
        version = 2 if rollout and seen >= round(config.rollout_at * totals[route]) else 1
        key = (tenant.id, version)
        if key not in heads:
            heads[key] = _head_text(tenant, version, rollout)
        offset = round(index / config.rate, 6)
        line = request_line(rng, index, offset)
        question = sentence(rng, rng.randint(8, 16))
        if route in config.bad_routes and config.id_position == "start":
            system, user = f"{line}\n\n{heads[key]}", question
        else:
            system, user = heads[key], f"{line}\n\n{question}"
        body: dict[str, Any] = {
            "model": config.model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
            ],
            "max_tokens": config.max_tokens,
            "temperature": 0.0,
            "stream": config.stream,
        }
        if config.stream:
            body["stream_options"] = {"include_usage": True}
        headers = {config.route_header: route, config.version_header: f"v{version}"}
        requests.append(
            TraceRequest(
                index=index,
                offset=offset,
                tenant=tenant.id,
                api_key=tenant.api_key,
                path=CHAT_PATH,
                body=body,
                stream=config.stream,
                conversation=None,
                turn=0,
                prefix_version=version,
                headers=headers,
            )
        )
    meta = {
        "generator": "load_tests.shapes",
        "config": config.to_json(),
        "requests": len(requests),
        "routes": {
            route: sorted({t.id for r, t in _route_tenants(config, tenants) if r == route})
            for route in config.routes
        },
    }
    return Trace(meta, requests)


def _route_tenants(config: ShapeConfig, tenants: list[Tenant]) -> list[tuple[str, Tenant]]:
    return [
        (route, tenants[i * config.tenants_per_route + k])
        for i, route in enumerate(config.routes)
        for k in range(config.tenants_per_route)
    ]


def rollout_config(**overrides: Any) -> ShapeConfig:
    """The rollout variant: a well-shaped route whose head changes version mid-run, beside
    the bad and good routes."""
    values: dict[str, Any] = {
        "routes": ("bad", "good", "rollout"),
        "rollout_routes": ("rollout",),
        **overrides,
    }
    return ShapeConfig(**values)
