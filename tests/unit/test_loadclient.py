"""The open-loop runner (load_tests.client) against an in-process fake router (no network)."""

from __future__ import annotations

import asyncio
import io
import json

import httpx
from rich.console import Console

from load_tests.client import RunOptions, run_trace
from load_tests.records import CANCELLED, NOT_SENT
from load_tests.workload import CHAT_PATH, TraceRequest

DECISION = "warm; policy=cache_aware; matched=4; best=4; blocks=9; load=1; cap=3"


def _request(index: int, offset: float, *, stream: bool, tenant: str = "t00") -> TraceRequest:
    body = {"model": "sim-model", "messages": [{"role": "user", "content": f"hi {index}"}],
            "max_tokens": 3, "stream": stream}  # fmt: skip
    return TraceRequest(index, offset, tenant, f"sk-{tenant}", CHAT_PATH, body, stream,
                        f"{tenant}-c1", index + 1, 0)  # fmt: skip


def _usage(prompt: int, cached: int) -> dict[str, object]:
    return {"prompt_tokens": prompt, "completion_tokens": 3, "total_tokens": prompt + 3,
            "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip


def _sse(*chunks: object) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def fake_router(request: httpx.Request) -> httpx.Response:
    """Answers like the router: decision headers, SSE or JSON, 401 for an unknown key."""
    if request.url.path == "/admin/workers":
        workers = [{"id": "w0", "healthy": True, "inflight": 2},
                   {"id": "w1", "healthy": True, "inflight": 0}]  # fmt: skip
        return httpx.Response(200, json={"workers": workers})
    if request.headers["authorization"] != "Bearer sk-t00":
        return httpx.Response(401, json={"error": {"message": "bad key", "type": "auth"}})
    body = json.loads(request.content)
    headers = {"x-prefix-router-worker": "w1", "x-prefix-router-decision": DECISION}
    if body["stream"]:
        content = _sse(
            {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
            {"choices": [{"index": 0, "delta": {"content": "lore"}}]},
            {"choices": [{"index": 0, "delta": {"content": "m ip"}}]},
            {"choices": [{"index": 0, "delta": {"content": "sum "}}]},
            {"choices": [], "usage": _usage(120, 64)},
        )
        return httpx.Response(200, headers={**headers, "content-type": "text/event-stream"},
                              content=content)  # fmt: skip
    reply = {"choices": [{"message": {"content": "lorem"}}], "usage": _usage(100, 32)}
    return httpx.Response(200, headers=headers, json=reply)


def _quiet() -> Console:
    return Console(file=io.StringIO(), force_terminal=False)


async def test_records_hold_what_the_router_answered() -> None:
    """Each record has status, worker, decision, tokens, TTFT and (streams) inter-token gaps."""
    trace = [_request(0, 0.0, stream=True), _request(1, 0.01, stream=False)]
    run = await run_trace(trace, "http://router", label="cache_aware",
                          transport=httpx.MockTransport(fake_router), console=_quiet())  # fmt: skip
    streamed, plain = run.records
    assert [r.ok for r in run.records] == [True, True]
    assert streamed.worker == "w1"
    assert streamed.decision is not None
    assert streamed.decision.reason == "warm"
    assert streamed.decision.cap == 3
    assert (streamed.prompt_tokens, streamed.cached_tokens) == (120, 64)
    assert len(streamed.itl) == 2
    assert streamed.ttft is not None
    assert streamed.latency is not None
    assert streamed.ttft <= streamed.latency
    assert (plain.prompt_tokens, plain.cached_tokens) == (100, 32)
    assert plain.ttft is not None
    assert plain.itl == []
    assert run.label == "cache_aware"


async def test_failures_are_recorded_not_raised() -> None:
    """A rejected request and an unreachable target become error records; the run completes."""
    rejected = _request(0, 0.0, stream=False, tenant="t99")
    run = await run_trace([rejected], "http://router", label="x",
                          transport=httpx.MockTransport(fake_router), console=_quiet())  # fmt: skip
    assert run.records[0].status == 401
    assert run.records[0].error == "http 401: bad key"

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    run = await run_trace([_request(0, 0.0, stream=True)], "http://router", label="x",
                          transport=httpx.MockTransport(refuse), console=_quiet())  # fmt: skip
    assert run.records[0].status == 0
    assert run.records[0].error is not None
    assert run.records[0].error.startswith("ConnectError")


async def test_requests_go_out_at_their_offsets() -> None:
    """Open loop: no request is sent before its offset, and none waits long after it."""
    trace = [_request(i, 0.05 * i, stream=i % 2 == 0) for i in range(6)]
    run = await run_trace(trace, "http://router", label="x",
                          transport=httpx.MockTransport(fake_router), console=_quiet())  # fmt: skip
    for record in run.records:
        assert record.started >= record.scheduled
        assert record.started - record.scheduled < 0.2


async def test_concurrency_is_bounded() -> None:
    """Never more requests in flight than `concurrency`, even when all are due at once."""
    in_flight = 0
    peak = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)  # the fake's service time, not a wait for state
        in_flight -= 1
        return fake_router(request)

    trace = [_request(i, 0.0, stream=False) for i in range(12)]
    run = await run_trace(trace, "http://router", label="x", options=RunOptions(concurrency=3),
                          transport=httpx.MockTransport(slow), console=_quiet())  # fmt: skip
    assert peak == 3
    assert all(r.ok for r in run.records)


async def test_run_stops_by_itself_when_the_target_hangs() -> None:
    """A hanging target cannot hold the run: in-flight requests are cancelled at the deadline,
    unsent ones are recorded as not sent."""
    never = asyncio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        await never.wait()
        return httpx.Response(200)

    trace = [_request(0, 0.0, stream=False), _request(1, 0.0, stream=False)]
    options = RunOptions(concurrency=1, drain_timeout=0.3)
    run = await asyncio.wait_for(
        run_trace(
            trace,
            "http://router",
            label="x",
            options=options,
            transport=httpx.MockTransport(hang),
            console=_quiet(),
        ),  # fmt: skip
        timeout=10,
    )
    assert [r.error for r in run.records] == [CANCELLED, NOT_SENT]
    assert run.elapsed < 5


async def test_duration_and_count_bound_what_is_sent() -> None:
    """Only requests with offset < duration are sent, and at most max_requests of them."""
    trace = [_request(i, 0.01 * i, stream=False) for i in range(10)]
    transport = httpx.MockTransport(fake_router)
    by_time = await run_trace(trace, "http://router", label="x", transport=transport,
                              options=RunOptions(duration=0.045), console=_quiet())  # fmt: skip
    assert [r.index for r in by_time.records] == [0, 1, 2, 3, 4]
    by_count = await run_trace(trace, "http://router", label="x", transport=transport,
                               options=RunOptions(max_requests=3), console=_quiet())  # fmt: skip
    assert len(by_count.records) == 3


async def test_admin_samples_give_per_worker_load() -> None:
    """With an admin token, the run samples in-flight counts per worker from the router."""
    trace = [_request(i, 0.02 * i, stream=False) for i in range(10)]
    options = RunOptions(admin_token="demo-admin", sample_interval=0.02)
    run = await run_trace(trace, "http://router", label="x", options=options,
                          transport=httpx.MockTransport(fake_router), console=_quiet())  # fmt: skip
    assert run.load_samples
    assert run.load_samples[0].inflight == {"w0": 2, "w1": 0}


async def test_progress_works_without_a_terminal() -> None:
    """Off a TTY (as in CI) the progress display prints plain lines instead of a live bar."""
    sink = io.StringIO()
    console = Console(file=sink, force_terminal=False)
    run = await run_trace([_request(0, 0.0, stream=False)], "http://router", label="demo-x",
                          transport=httpx.MockTransport(fake_router), console=console)  # fmt: skip
    assert run.records[0].ok
    assert "[demo-x] 1/1 done, 0 errors" in sink.getvalue()
    assert "\x1b[" not in sink.getvalue()
