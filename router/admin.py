"""The admin API: workers, live tuning, settings reload, a dry run that explains a
routing decision, and the insights report.

Off unless ``server.admin_token`` is set; every call then needs ``Authorization: Bearer
<admin_token>`` (compared in constant time). Without a token the routes answer 404, as if
they did not exist.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import resource
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from router.config import WorkerSpec
from router.core.bounded import load_cap
from router.core.model import Decision, WorkerId
from router.errors import BadRequest, NotFound, Unauthorized
from router.handlers import INSIGHTS
from router.insights import disabled_snapshot
from router.parse import Endpoint, decode_body, parse_request
from router.state import STATE, RouterState


def _authorize(request: web.Request) -> RouterState:
    state = request.app[STATE]
    token = state.settings.server.admin_token
    if token is None:
        raise NotFound(f"no route {request.method} {request.path} (the admin API is disabled)")
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    expected = token.get_secret_value().encode()
    # surrogateescape: header bytes that are not UTF-8 make a wrong token (401), not a 500.
    presented = value.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented, expected):
        raise Unauthorized("admin API: missing or wrong admin token")
    return state


async def list_workers(request: web.Request) -> web.Response:
    state = _authorize(request)
    sizes = state.index.stats()
    workers = state.pool.snapshot()
    for entry in workers:
        entry["index_blocks"] = sizes.get(WorkerId(str(entry["id"])), 0)
    return web.json_response({"policy": state.router.policy.name, "workers": workers})


async def add_worker(request: web.Request) -> web.Response:
    state = _authorize(request)
    body = decode_body(await request.read())
    try:
        spec = WorkerSpec.model_validate(body)
    except ValidationError as exc:
        raise BadRequest(f"invalid worker: {exc.errors()[0]['msg']}") from None
    try:
        worker = state.pool.add(spec)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    state.metrics.worker_added(worker.id)
    return web.json_response({"added": worker.id}, status=201)


async def remove_worker(request: web.Request) -> web.Response:
    state = _authorize(request)
    worker_id = WorkerId(request.match_info["worker_id"])
    try:
        state.pool.remove(worker_id)
    except KeyError:
        raise NotFound(f"no worker {worker_id!r}") from None
    await state.index.clear(worker_id)
    state.metrics.worker_removed(worker_id)
    return web.json_response({"removed": worker_id})


def _rss_bytes() -> int:
    """Resident set size now (Linux /proc; elsewhere the peak, from getrusage)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


async def process_stats(request: web.Request) -> web.Response:
    """Resource figures of this process, for soak tests and leak hunting (read-only)."""
    state = _authorize(request)
    index_blocks = state.index.stats()
    return web.json_response(
        {
            "pid": os.getpid(),
            "rss_bytes": _rss_bytes(),
            "open_fds": _open_fds(),
            "asyncio_tasks": len(asyncio.all_tasks()),
            "inflight": state.inflight.count,
            "worker_inflight": {w.id: w.inflight for w in state.pool.members()},
            "index_blocks": dict(index_blocks),
            "index_blocks_total": sum(index_blocks.values()),
        }
    )


def _tuning_dict(state: RouterState) -> dict[str, Any]:
    tuning = state.tuning.current
    return {name: getattr(tuning, name) for name in tuning.__dataclass_fields__}


def _sharing(state: RouterState) -> dict[str, Any]:
    shared = state.shared_tuning
    return {"scope": "replica"} if shared is None else shared.status()


async def get_config(request: web.Request) -> web.Response:
    state = _authorize(request)
    settings = state.settings.model_dump(mode="json")
    last = state.reloader.last
    return web.json_response(
        {
            "tuning": _tuning_dict(state),
            "shared_tuning": _sharing(state),
            "settings": settings,
            "last_reload": None if last is None else last.to_json(),
        }
    )


async def reload_settings(request: web.Request) -> web.Response:
    """Read the settings file and environment again, as SIGHUP does; answer what changed."""
    state = _authorize(request)
    if not state.reloader.available:
        raise BadRequest("this router was started without a settings source to read again")
    result = await state.reloader.reload("admin")
    if result.result == "rejected":
        raise BadRequest(f"settings reload rejected, the running settings stay: {result.error}")
    return web.json_response(result.to_json())


async def put_config(request: web.Request) -> web.Response:
    """Change live thresholds: on every replica when they are shared through Redis (the
    default then), or on this replica alone (``?scope=replica``, or without Redis)."""
    state = _authorize(request)
    shared = state.shared_tuning
    scope = request.query.get("scope", "replica" if shared is None else "fleet")
    if scope not in ("fleet", "replica"):
        raise BadRequest(f"scope must be fleet or replica, got {scope!r}", param="scope")
    if scope == "fleet" and shared is None:
        raise BadRequest(
            "scope=fleet needs the thresholds shared through Redis (index.kind or loads.kind "
            "redis, and redis.share_tuning); this router changes them per replica",
            param="scope",
        )
    body = decode_body(await request.read())
    changes = body.get("tuning", body)
    if not isinstance(changes, dict):
        raise BadRequest("expected an object of tuning fields")
    try:
        if scope == "fleet":
            assert shared is not None
            await shared.change(changes)
        else:
            state.tuning.update(changes)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    return web.json_response({"tuning": _tuning_dict(state), "shared_tuning": _sharing(state)})


async def dry_route(request: web.Request) -> web.Response:
    """Answer the decision the router would take for this body, and why, without sending it."""
    state = _authorize(request)
    raw = await request.read()
    endpoint_name = request.query.get("endpoint")
    if endpoint_name is None:
        endpoint_name = "chat" if b'"messages"' in raw else "completions"
    if endpoint_name not in ("chat", "completions"):
        raise BadRequest("endpoint must be 'chat' or 'completions'", param="endpoint")
    endpoint: Endpoint = "chat" if endpoint_name == "chat" else "completions"
    tenant = request.query.get("tenant", state.settings.tenants.default_tenant)
    parsed = parse_request(endpoint, raw)
    route_request = await state.router.plan(parsed, tenant, state.tenants.cache_salt(tenant))
    view, _ = await state.router.view(route_request)
    decision = state.router.policy.choose(route_request, view)
    tuning = view.tuning
    cap = load_cap(tuning.load_factor, view.total_load, len(view.workers), tuning.load_floor)
    order = (
        list(view.ring.walk(route_request.affinity_key))
        if route_request.affinity_key is not None
        else []
    )
    candidates = [
        {
            "id": w.id,
            "load": w.load,
            "warm_blocks": w.warm_depth,
            "under_cap": w.load + 1 <= cap,
            "ring_rank": order.index(w.id) if w.id in order else None,
        }
        for w in view.workers
    ]
    candidates.sort(key=lambda c: (c["ring_rank"] is None, c["ring_rank"] or 0))
    return web.json_response(
        {
            "tenant": tenant,
            "decision": _decision_dict(decision, state.router.policy.name),
            "explanation": explain(decision, cap),
            "blocks": len(route_request.chain),
            "affinity_key": None
            if route_request.affinity_key is None
            else f"{route_request.affinity_key:016x}",
            "cap": cap,
            "tuning": _tuning_dict(state),
            "candidates": candidates,
        }
    )


def _decision_dict(decision: Decision, policy: str) -> dict[str, Any]:
    return {
        "policy": policy,
        "worker": decision.worker,
        "reason": decision.reason,
        "matched_blocks": decision.matched_blocks,
        "best_available_blocks": decision.best_available_blocks,
        "affinity_worker": decision.affinity_worker,
        "cap": decision.cap,
        "total_blocks": decision.total_blocks,
    }


def explain(decision: Decision, cap: int) -> str:
    if decision.reason == "warm":
        return (
            f"{decision.worker} holds the longest warm prefix ({decision.matched_blocks} of "
            f"{decision.total_blocks} blocks) and is under the load cap ({cap})"
        )
    if decision.reason == "spill":
        return (
            f"the preferred worker was at the load cap ({cap}); spilled to {decision.worker} "
            f"(warm blocks there: {decision.matched_blocks}, best anywhere: "
            f"{decision.best_available_blocks})"
        )
    if decision.reason == "affinity":
        if decision.worker == decision.affinity_worker:
            placed = f"{decision.worker} owns the prefix on the ring"
        else:
            placed = (
                f"{decision.worker} is less loaded than the ring owner "
                f"{decision.affinity_worker} among the prefix's first workers on the ring"
            )
        return (
            f"no warm match long enough (best: {decision.best_available_blocks} blocks); "
            f"{placed} and is under the cap ({cap})"
        )
    return f"no prefix to be affine to, or a load-only policy: chose {decision.worker}"


async def insights(request: web.Request) -> web.Response:
    """The prompt-shape advisor, prefix versions and savings report (docs/insights.md)."""
    _authorize(request)
    recorder = request.app.get(INSIGHTS)
    return web.json_response(recorder.snapshot() if recorder is not None else disabled_snapshot())


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/admin/workers", list_workers)
    app.router.add_get("/admin/stats", process_stats)
    app.router.add_post("/admin/workers", add_worker)
    app.router.add_delete("/admin/workers/{worker_id}", remove_worker)
    app.router.add_get("/admin/config", get_config)
    app.router.add_put("/admin/config", put_config)
    app.router.add_post("/admin/reload", reload_settings)
    app.router.add_post("/admin/route", dry_route)
    app.router.add_get("/admin/insights", insights)
