"""Streaming passthrough: chunks arrive as generated, usage only when asked, errors well-formed."""

from __future__ import annotations

import json
import time

import httpx

from tests.integration.conftest import (
    RouterFactory,
    SimFactory,
    chat_body,
    metric_value,
    set_fault,
    settings_for,
)

HEAD = "You are a careful assistant. " * 40


async def _stream(
    client: httpx.AsyncClient, body: dict[str, object]
) -> tuple[list[tuple[float, str]], float, httpx.Response]:
    """(arrival time, data payload) of each SSE event, and the request start time."""
    events: list[tuple[float, str]] = []
    started = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append((time.perf_counter(), line[6:]))
    return events, started, response


async def test_first_chunk_arrives_before_generation_ends(
    sims: SimFactory, router: RouterFactory
) -> None:
    """The client sees the first SSE chunk long before the worker finishes generating."""
    workers = sims(1, decode_ms_per_token=20)
    running = await router(settings_for(workers))
    body = chat_body(HEAD, "count slowly", stream=True, max_tokens=40)
    async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
        events, started, response = await _stream(client, body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert events[-1][1] == "[DONE]"
    first, last = events[0][0] - started, events[-1][0] - started
    assert last > 0.6  # 40 tokens at 20 ms each
    assert first < last / 3, (first, last)


async def test_usage_chunk_only_when_client_asks(sims: SimFactory, router: RouterFactory) -> None:
    """Without include_usage the client gets no usage; with it, the final chunk carries it."""
    workers = sims(1)
    running = await router(settings_for(workers))
    async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
        plain, _, _ = await _stream(client, chat_body(HEAD, "hi", stream=True))
        asked, _, _ = await _stream(
            client,
            chat_body(HEAD, "hi", stream=True, stream_options={"include_usage": True}),
        )
    plain_chunks = [json.loads(data) for _, data in plain if data != "[DONE]"]
    asked_chunks = [json.loads(data) for _, data in asked if data != "[DONE]"]
    assert plain_chunks
    assert all("usage" not in c or c["usage"] is None for c in plain_chunks)
    assert all(c["choices"] for c in plain_chunks)
    usage = asked_chunks[-1]["usage"]
    assert asked_chunks[-1]["choices"] == []
    assert usage["prompt_tokens"] > 0
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0  # same prefix, same worker
    # The router read usage in both cases (it asked the worker itself), so it counts both.
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
        exposition = (await client.get("/metrics")).text
    counted = metric_value(exposition, "prefix_router_prompt_tokens_total", route="chat")
    assert counted == 2 * usage["prompt_tokens"]


async def test_worker_failing_mid_stream_ends_with_error_event(
    sims: SimFactory, router: RouterFactory
) -> None:
    """A worker that dies after the first chunk ends the stream with an error event, no hang."""
    workers = sims(1, decode_ms_per_token=5)
    running = await router(settings_for(workers))
    await set_fault(workers[0], mode="crash", after_chunks=3)
    async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
        events, _, response = await _stream(
            client, chat_body(HEAD, "x", stream=True, max_tokens=50)
        )
    assert response.status_code == 200
    payloads = [data for _, data in events]
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])
    assert error["error"]["type"] == "upstream_error"
    assert "mid-stream" in error["error"]["message"]
