"""Open-loop load runner: sends a trace to one base URL and records what happened.

Each trace request goes out at its offset whether or not earlier ones have answered (open
loop, as real clients behave), with two bounds so a run always ends by itself: at most
``concurrency`` requests in flight (a request waits for a slot, and the record shows how
late it went out), and a hard deadline (``duration`` plus ``drain_timeout``), after which
unsent requests are recorded as not sent and in-flight ones are cancelled and recorded as
such. The runner knows nothing about what it targets (our router under some policy, a peer
router, a bare worker): it reads the router's headers when present and samples
``GET /admin/workers`` only when given an admin token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from load_tests.records import (
    CANCELLED,
    NOT_SENT,
    ROUTER_DECISION_HEADER,
    ROUTER_WORKER_HEADER,
    WORKER_ID_HEADER,
    LoadSample,
    RequestRecord,
    RunResult,
    parse_decision,
)
from load_tests.workload import TraceRequest


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Bounds and extras of one run."""

    concurrency: int = 64
    duration: float | None = None
    """Send only requests with offset < duration (None: the whole trace)."""
    max_requests: int | None = None
    request_timeout: float = 30.0
    """Per-request connect/read timeout (httpx semantics: between bytes, not in total)."""
    drain_timeout: float = 15.0
    """After the send window, how long in-flight requests may still take."""
    admin_token: str | None = None
    """When set, sample ``GET /admin/workers`` for per-worker in-flight counts."""
    sample_interval: float = 0.25
    progress: bool = True
    extra_headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")


class _ProgressView:
    """A rich progress bar on a terminal; on anything else (CI logs) a line every few seconds."""

    def __init__(self, console: Console, label: str, total: int, enabled: bool) -> None:
        self._console = console
        self._label = label
        self._total = total
        self._enabled = enabled
        self._live = enabled and console.is_terminal
        self._done = 0
        self._errors = 0
        self._last_line = time.monotonic()
        self._progress: Progress | None = None
        self._task_id: Any = None

    def __enter__(self) -> _ProgressView:
        if self._live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("errors {task.fields[errors]}"),
                TimeElapsedColumn(),
                console=self._console,
                transient=False,
            )
            self._progress.start()
            self._task_id = self._progress.add_task(self._label, total=self._total, errors=0)
        return self

    def advance(self, ok: bool) -> None:
        self._done += 1
        self._errors += not ok
        if self._progress is not None:
            self._progress.update(self._task_id, advance=1, errors=self._errors)
        elif self._enabled and time.monotonic() - self._last_line >= 5.0:
            self._last_line = time.monotonic()
            self._line()

    def _line(self) -> None:
        self._console.print(
            f"[{self._label}] {self._done}/{self._total} done, {self._errors} errors",
            highlight=False,
            markup=False,
        )

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
        elif self._enabled:
            self._line()


def _apply_usage(record: RequestRecord, usage: Any) -> None:
    if not isinstance(usage, dict):
        return
    record.prompt_tokens = _as_int(usage.get("prompt_tokens"))
    record.completion_tokens = _as_int(usage.get("completion_tokens"))
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict):
        record.cached_tokens = _as_int(details.get("cached_tokens"))


def _as_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) else None


def _error_message(raw: bytes) -> str:
    try:
        obj = json.loads(raw)
        message = obj["error"]["message"] if isinstance(obj.get("error"), dict) else obj
    except (ValueError, KeyError, TypeError, AttributeError):
        message = raw.decode(errors="replace")
    return str(message)[:200]


def _content_piece(choice: Any) -> str:
    if not isinstance(choice, dict):
        return ""
    text = choice.get("text")
    if text:
        return str(text)
    delta = choice.get("delta")
    if isinstance(delta, dict) and delta.get("content"):
        return str(delta["content"])
    return ""


async def _read_stream(response: httpx.Response, record: RequestRecord, sent_at: float) -> None:
    """Consume an SSE body: first-content time, gaps between content chunks, usage, errors."""
    last: float | None = None
    done = False
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            # Keep reading to the end of the body: a response left unread makes httpx drop
            # the connection (the router then logs a client disconnect for it).
            done = True
            continue
        obj = json.loads(data)
        if not isinstance(obj, dict):
            continue
        if "error" in obj:
            error = obj["error"]
            message = error.get("message") if isinstance(error, dict) else error
            record.error = f"stream error: {str(message)[:200]}"
        if obj.get("usage"):
            _apply_usage(record, obj["usage"])
        if any(_content_piece(c) for c in obj.get("choices") or ()):
            now = time.perf_counter()
            if last is None:
                record.ttft = now - sent_at
            else:
                record.itl.append(now - last)
            last = now
    if not done and record.error is None:
        record.error = "stream ended without [DONE]"


async def send_request(
    client: httpx.AsyncClient,
    request: TraceRequest,
    body: bytes,
    record: RequestRecord,
    *,
    t0: float,
    request_id: str,
    extra_headers: Mapping[str, str],
) -> None:
    """Send one trace request and fill ``record`` in place (never raises for HTTP failures)."""
    headers = {
        "authorization": f"Bearer {request.api_key}",
        "content-type": "application/json",
        "x-request-id": request_id,
        **extra_headers,
        **request.headers,
    }
    sent_at = time.perf_counter()
    record.started = sent_at - t0
    try:
        async with client.stream("POST", request.path, content=body, headers=headers) as resp:
            record.status = resp.status_code
            record.worker = resp.headers.get(ROUTER_WORKER_HEADER) or resp.headers.get(
                WORKER_ID_HEADER
            )
            record.decision = parse_decision(resp.headers.get(ROUTER_DECISION_HEADER))
            if not 200 <= resp.status_code < 300:
                record.error = f"http {resp.status_code}: {_error_message(await resp.aread())}"
            elif request.stream:
                await _read_stream(resp, record, sent_at)
            else:
                payload = json.loads(await resp.aread())
                record.ttft = time.perf_counter() - sent_at
                _apply_usage(record, payload.get("usage") if isinstance(payload, dict) else None)
    except httpx.TimeoutException as exc:
        record.error = f"timeout: {type(exc).__name__}"
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:200]
    except ValueError as exc:  # malformed JSON from the target
        record.error = f"bad response: {exc}"[:200]
    finally:
        record.finished = time.perf_counter() - t0
        record.latency = time.perf_counter() - sent_at


async def sample_loads(
    client: httpx.AsyncClient,
    admin_token: str,
    interval: float,
    t0: float,
    samples: list[LoadSample],
    stop: asyncio.Event,
) -> None:
    """Poll ``GET /admin/workers`` every ``interval`` s until ``stop``; give up on 404/401."""
    headers = {"authorization": f"Bearer {admin_token}"}
    while not stop.is_set():
        try:
            resp = await client.get("/admin/workers", headers=headers)
            if resp.status_code in (401, 403, 404):
                return
            if resp.status_code == 200:
                workers = resp.json().get("workers") or []
                inflight = {str(w["id"]): int(w.get("inflight") or 0) for w in workers}
                samples.append(LoadSample(time.perf_counter() - t0, inflight))
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            pass  # a missed sample is not worth failing the run over
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()


def _new_record(request: TraceRequest) -> RequestRecord:
    return RequestRecord(
        index=request.index,
        tenant=request.tenant,
        path=request.path,
        stream=request.stream,
        conversation=request.conversation,
        turn=request.turn,
        prefix_version=request.prefix_version,
        scheduled=request.offset,
    )


def select_requests(requests: Sequence[TraceRequest], options: RunOptions) -> list[TraceRequest]:
    """The requests a run will try to send, given its duration and count bounds."""
    chosen = [r for r in requests if options.duration is None or r.offset < options.duration]
    if options.max_requests is not None:
        chosen = chosen[: options.max_requests]
    return chosen


async def run_trace(
    requests: Sequence[TraceRequest],
    base_url: str | Sequence[str],
    *,
    label: str,
    options: RunOptions | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    console: Console | None = None,
) -> RunResult:
    """Drive ``requests`` against ``base_url`` and return one record per request.

    Several base URLs (router replicas) share the requests round robin by trace position,
    as an ingress without affinity would; loads are sampled from the first.

    ``transport`` replaces the network (tests pass an ``httpx.MockTransport``).
    """
    options = options or RunOptions()
    console = console or Console(stderr=True)
    chosen = select_requests(requests, options)
    bodies = [json.dumps(r.body, separators=(",", ":")).encode() for r in chosen]
    window = (
        options.duration
        if options.duration is not None
        else max((r.offset for r in chosen), default=0.0)
    )
    records = [_new_record(r) for r in chosen]
    samples: list[LoadSample] = []
    timeout = httpx.Timeout(options.request_timeout, connect=5.0)
    limits = httpx.Limits(
        max_connections=options.concurrency, max_keepalive_connections=options.concurrency
    )
    slots = asyncio.Semaphore(options.concurrency)
    stop_sampling = asyncio.Event()
    tasks: dict[int, asyncio.Task[None]] = {}
    run_start = time.time()
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    if not urls:
        raise ValueError("run_trace needs at least one base URL")
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=url,
                    timeout=timeout,
                    limits=limits,
                    transport=transport,
                    trust_env=False,
                )
            )
            for url in urls
        ]
        admin_client = await stack.enter_async_context(
            httpx.AsyncClient(
                base_url=urls[0], timeout=httpx.Timeout(2.0), transport=transport, trust_env=False
            )
        )
        t0 = time.perf_counter()
        deadline = t0 + window + options.drain_timeout
        sampler = None
        if options.admin_token:
            sampler = asyncio.create_task(
                sample_loads(
                    admin_client,
                    options.admin_token,
                    options.sample_interval,
                    t0,
                    samples,
                    stop_sampling,
                )
            )
        with _ProgressView(console, label, len(chosen), options.progress) as progress:

            def on_done(record: RequestRecord) -> Callable[[asyncio.Task[None]], None]:
                def done(task: asyncio.Task[None]) -> None:
                    slots.release()
                    if not task.cancelled():
                        progress.advance(record.ok)

                return done

            try:
                for i, request in enumerate(chosen):
                    delay = t0 + request.offset - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a Ctrl-C
                    # cancellation that lands just as the slot is granted.
                    try:
                        async with asyncio.timeout(remaining):
                            await slots.acquire()
                    except TimeoutError:
                        break
                    record = records[i]
                    task = asyncio.create_task(
                        send_request(
                            clients[i % len(clients)],
                            request,
                            bodies[i],
                            record,
                            t0=t0,
                            request_id=f"{label}-{request.index}",
                            extra_headers=options.extra_headers,
                        )
                    )
                    task.add_done_callback(on_done(record))
                    tasks[i] = task
                pending = [t for t in tasks.values() if not t.done()]
                if pending:
                    await asyncio.wait(pending, timeout=max(0.0, deadline - time.perf_counter()))
            finally:
                for task in tasks.values():
                    task.cancel()
                await asyncio.gather(*tasks.values(), return_exceptions=True)
                stop_sampling.set()
                if sampler is not None:
                    await asyncio.gather(sampler, return_exceptions=True)
        end = time.perf_counter() - t0
    for i, record in enumerate(records):
        sent = tasks.get(i)
        if sent is None:
            record.error = NOT_SENT
            record.started = record.finished = end
        elif sent.cancelled():
            record.error = CANCELLED
            record.finished = end
    meta = {
        "base_url": urls[0] if len(urls) == 1 else urls,
        "started_at": run_start,
        "concurrency": options.concurrency,
        "duration": options.duration,
        "max_requests": options.max_requests,
        "drain_timeout": options.drain_timeout,
        "request_timeout": options.request_timeout,
        "sampled_loads": bool(options.admin_token),
    }
    return RunResult(label, records, samples, meta, elapsed=end)
