"""The simulator's HTTP surface: vLLM's OpenAI endpoints plus the ``/sim`` test endpoints.

``create_app(config)`` builds an aiohttp application that owns one `SimState` (cache,
engine, metrics, faults, request log, and the KV-event publisher when ``config.kv_events`` is
set: opened at startup, flushed and closed at cleanup) under the `SIM_STATE` key. Every
response carries ``x-worker-id``. Inference requests are validated (`protocol`), may be hit
by an injected fault (`faults`), then run through the `Engine`; streamed tokens are written as
they come due, several per write when they fall in the same ``stream_interval_ms``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, NoReturn

import msgspec
from aiohttp import web

from worker.sim.cache import CacheListener, PrefixCache
from worker.sim.config import SimConfig
from worker.sim.engine import Engine, SimRequest
from worker.sim.faults import Fault, FaultInjector, parse_fault
from worker.sim.hashing import BlockHasher
from worker.sim.metrics import PROMETHEUS_CONTENT_TYPE, SimMetrics
from worker.sim.peer_api import PeerApi
from worker.sim.protocol import ApiError, Kind, ParsedRequest, decode_body, parse_request
from worker.sim.request_log import RequestLog, RequestRecord
from worker.sim.responses import (
    DONE,
    StreamEncoder,
    chat_completion,
    error_event,
    text_completion,
    usage_fields,
)
from worker.sim.tokenizer import filler_text

if TYPE_CHECKING:
    from worker.sim.kv_publisher import KvEventPublisher

logger = logging.getLogger("worker.sim")

SIM_VERSION = "0.1.0+sim"
NON_STREAM_TICK_S = 0.05
"""How often a non-streamed request's decode progress is pushed into the cache."""
DEFAULT_REQUESTS_LIMIT = 100

_STREAM_FAULTS = ("error", "hang", "crash")
_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


@dataclass(eq=False)
class SimState:
    """Everything one simulated worker owns."""

    config: SimConfig
    cache: PrefixCache
    engine: Engine
    metrics: SimMetrics
    faults: FaultInjector
    log: RequestLog
    exit_process: Callable[[int], NoReturn]
    started: int = field(default_factory=lambda: int(time.time()))
    requests_total: int = 0
    kv_events: KvEventPublisher | None = None


SIM_STATE = web.AppKey("sim_state", SimState)


def build_state(
    config: SimConfig,
    *,
    listeners: list[CacheListener] | None = None,
    exit_process: Callable[[int], NoReturn] = os._exit,
) -> SimState:
    """Wire cache, engine and metrics for ``config``."""
    cache = PrefixCache(
        config.cache_blocks, BlockHasher(config.block_size, config.hash_seed), listeners
    )
    metrics = SimMetrics(config)
    return SimState(
        config=config,
        cache=cache,
        engine=Engine(config, cache, metrics),
        metrics=metrics,
        faults=FaultInjector(),
        log=RequestLog(),
        exit_process=exit_process,
    )


def create_app(
    config: SimConfig,
    *,
    listeners: list[CacheListener] | None = None,
    exit_process: Callable[[int], NoReturn] = os._exit,
) -> web.Application:
    """The simulator as an aiohttp application (see the module docstring)."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SIM_STATE] = build_state(config, listeners=listeners, exit_process=exit_process)
    if config.kv_events is not None:
        app.cleanup_ctx.append(_kv_events)
    app.on_response_prepare.append(_add_worker_id)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/version", _version)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/sim/fault", _set_fault)
    app.router.add_get("/sim/fault", _get_fault)
    app.router.add_get("/sim/state", _state)
    app.router.add_get("/sim/requests", _requests)
    app.router.add_post("/sim/reset", _reset)
    PeerApi(config, version=SIM_VERSION).register(app)
    return app


async def _kv_events(app: web.Application) -> AsyncIterator[None]:
    """Publish the cache's events while the app runs (zmq is imported only when enabled)."""
    from worker.sim.kv_publisher import KvEventPublisher

    state = app[SIM_STATE]
    assert state.config.kv_events is not None
    publisher = KvEventPublisher(state.config.kv_events)
    await publisher.start()
    state.kv_events = publisher
    state.cache.listeners.append(publisher.listener)
    try:
        yield
    finally:
        state.cache.listeners.remove(publisher.listener)
        await publisher.close()


async def _add_worker_id(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["x-worker-id"] = request.app[SIM_STATE].config.worker_id


def _json(data: Any, status: int = 200) -> web.Response:
    body = msgspec.json.encode(data)
    return web.Response(body=body, status=status, content_type="application/json")


def _error(err: ApiError) -> web.Response:
    return web.Response(body=err.body(), status=err.status, content_type="application/json")


def _fault_error(fault: Fault) -> ApiError:
    err_type = _ERROR_TYPES.get(fault.status)
    if err_type is None:
        try:
            err_type = HTTPStatus(fault.status).phrase
        except ValueError:
            err_type = "Error"
    return ApiError(
        f"Simulated fault: HTTP {fault.status}.", status=fault.status, err_type=err_type
    )


async def _forever() -> None:
    await asyncio.Event().wait()


# ---- inference --------------------------------------------------------------------------


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _inference(request, "chat")


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _inference(request, "completion")


async def _inference(request: web.Request, kind: Kind) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    config = state.config
    state.requests_total += 1
    raw = await request.read()
    try:
        parsed = parse_request(
            kind,
            decode_body(raw),
            served_model=config.model,
            max_model_len=config.effective_max_model_len,
        )
    except ApiError as err:
        return _error(err)

    fault = state.faults.take()
    record = state.log.add(
        path=request.path,
        stream=parsed.stream,
        cache_salt=parsed.cache_salt,
        prompt_tokens=len(parsed.prompt_ids),
        max_tokens=parsed.max_tokens,
        headers=request.headers,
        fault=None if fault.mode == "none" else fault.mode,
    )
    if fault.mode == "slow" and fault.delay_ms > 0:
        await asyncio.sleep(fault.delay_ms / 1000)
    in_stream_fault = (
        parsed.stream and fault.after_chunks is not None and fault.mode in _STREAM_FAULTS
    )
    if not in_stream_fault:
        if fault.mode == "crash":
            logger.warning("simulated crash")
            state.exit_process(1)
        if fault.mode == "error":
            return _error(_fault_error(fault))
        if fault.mode == "hang":
            await _forever()

    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    request_id = prefix + (request.headers.get("x-request-id") or uuid.uuid4().hex)
    sim_request = state.engine.new_request(
        request_id, parsed.prompt_ids, parsed.max_tokens, parsed.cache_salt
    )
    record.block_hashes = sim_request.block_hashes
    if parsed.stream:
        return await _stream(request, state, parsed, sim_request, record, fault)
    return await _complete(state, parsed, sim_request, record)


def _cached_for_usage(state: SimState, sim_request: SimRequest) -> int | None:
    if not state.config.prompt_tokens_details:
        return None
    return sim_request.cached_tokens or 0


async def _complete(
    state: SimState, parsed: ParsedRequest, sim_request: SimRequest, record: RequestRecord
) -> web.Response:
    produced = 0
    async with aclosing(state.engine.run(sim_request, interval=NON_STREAM_TICK_S)) as tokens:
        async for count in tokens:
            produced = count
            if record.cached_tokens is None:
                record.cached_tokens = sim_request.cached_tokens
    text = "".join(filler_text(i) for i in range(produced))
    usage = usage_fields(len(parsed.prompt_ids), produced, _cached_for_usage(state, sim_request))
    build = chat_completion if parsed.kind == "chat" else text_completion
    body = build(sim_request.request_id, int(time.time()), state.config.model, text, usage)
    return web.Response(body=body, content_type="application/json")


class _StreamWriter:
    """Writes SSE events, applying an ``after_chunks`` fault when its budget runs out."""

    def __init__(self, response: web.StreamResponse, fault: Fault, state: SimState) -> None:
        self._response = response
        self._fault = fault
        self._state = state
        self._budget = fault.after_chunks if fault.mode in _STREAM_FAULTS else None

    async def write(self, events: list[bytes]) -> bool:
        """Write ``events``; False once the stream must end (fault fired)."""
        if self._budget is None or len(events) <= self._budget:
            if self._budget is not None:
                self._budget -= len(events)
            await self._response.write(b"".join(events))
            return True
        allowed = events[: self._budget]
        if allowed:
            await self._response.write(b"".join(allowed))
        await self._fire()
        return False

    async def _fire(self) -> None:
        mode = self._fault.mode
        if mode == "crash":
            logger.warning("simulated crash mid-stream")
            self._state.exit_process(1)
        elif mode == "hang":
            await _forever()
        else:
            body = _fault_error(self._fault).body()
            await self._response.write(error_event(body) + DONE)


async def _stream(
    request: web.Request,
    state: SimState,
    parsed: ParsedRequest,
    sim_request: SimRequest,
    record: RequestRecord,
    fault: Fault,
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    encoder = StreamEncoder(
        parsed.kind,
        sim_request.request_id,
        int(time.time()),
        state.config.model,
        len(parsed.prompt_ids),
        continuous_usage=parsed.continuous_usage,
    )
    writer = _StreamWriter(response, fault, state)
    interval = state.config.stream_interval_ms / 1000
    sent = 0
    try:
        async with aclosing(state.engine.run(sim_request, interval=interval)) as tokens:
            async for produced in tokens:
                events: list[bytes] = []
                if sent == 0:
                    record.cached_tokens = sim_request.cached_tokens
                    if parsed.kind == "chat":
                        events.append(encoder.role_chunk())
                for index in range(sent, produced):
                    last = index + 1 == parsed.max_tokens
                    events.append(encoder.token_chunk(filler_text(index), index + 1, last=last))
                sent = produced
                if not await writer.write(events):
                    return response
        tail: list[bytes] = []
        if parsed.include_usage:
            tail.append(encoder.usage_chunk(sent, _cached_for_usage(state, sim_request)))
        tail.append(DONE)
        if await writer.write(tail):
            await response.write_eof()
    except ConnectionResetError:
        # The client went away; closing the token iterator above already aborted the request.
        logger.debug("client disconnected from %s", sim_request.request_id)
    return response


# ---- info endpoints ---------------------------------------------------------------------


async def _models(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    model = state.config.model
    return _json(
        {
            "object": "list",
            "data": [
                {
                    "id": model,
                    "object": "model",
                    "created": state.started,
                    "owned_by": "vllm",
                    "root": model,
                    "parent": None,
                    "max_model_len": state.config.effective_max_model_len,
                    "permission": [
                        {
                            "id": f"modelperm-{uuid.uuid4().hex}",
                            "object": "model_permission",
                            "created": state.started,
                            "allow_create_engine": False,
                            "allow_sampling": True,
                            "allow_logprobs": True,
                            "allow_search_indices": False,
                            "allow_view": True,
                            "allow_fine_tuning": False,
                            "organization": "*",
                            "group": None,
                            "is_blocking": False,
                        }
                    ],
                }
            ],
        }
    )


async def _health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def _version(request: web.Request) -> web.Response:
    return _json({"version": SIM_VERSION})


async def _metrics(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    body = state.metrics.render(state.engine, state.cache)
    response = web.Response(body=body)
    response.headers["Content-Type"] = PROMETHEUS_CONTENT_TYPE
    return response


# ---- /sim endpoints ---------------------------------------------------------------------


async def _set_fault(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    try:
        fault = parse_fault(decode_body(await request.read()))
    except ApiError as err:
        return _error(err)
    except ValueError as exc:
        return _error(ApiError(str(exc), err_type="Bad Request"))
    state.faults.set(fault)
    logger.info("fault set: %s", fault)
    return _json(state.faults.current.to_json())


async def _get_fault(request: web.Request) -> web.Response:
    return _json(request.app[SIM_STATE].faults.current.to_json())


async def _state(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    cache = state.cache
    return _json(
        {
            "worker_id": state.config.worker_id,
            "model": state.config.model,
            "block_size": cache.block_size,
            "cache_blocks": cache.num_blocks,
            "cached_blocks": cache.num_cached,
            "used_blocks": cache.num_used,
            "free_blocks": cache.num_free,
            "reserved_blocks": cache.num_reserved,
            "kv_cache_usage": cache.usage,
            "running": state.engine.num_running,
            "waiting": state.engine.num_waiting,
            "requests_total": state.requests_total,
            "fault": state.faults.current.to_json(),
            "kv_events": None if state.kv_events is None else state.kv_events.state(),
        }
    )


async def _requests(request: web.Request) -> web.Response:
    raw = request.query.get("limit", str(DEFAULT_REQUESTS_LIMIT))
    try:
        limit = int(raw)
    except ValueError:
        return _error(ApiError("'limit' must be an integer.", err_type="Bad Request"))
    return _json({"requests": request.app[SIM_STATE].log.last(limit)})


async def _reset(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    state.cache.reset()
    state.metrics.reset()
    state.faults.reset()
    state.log.clear()
    state.requests_total = 0
    return _json({"reset": True})
