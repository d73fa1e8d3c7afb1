"""Fixtures and helpers for the fault-injection suite.

Reuses the integration fixtures (`sims`, `router`, `redis_server`) and adds what every fault
test needs: a `Tally` of one run (sent, ok, retried, failed, lost, streams cut), a load
driver for non-streaming and streaming requests at a fixed concurrency, and a session-wide
`fault_log` that prints every fault's figures once at the end (and writes them as JSON lines
under pytest's temporary directory) so the faults table in docs/reliability.md can be filled
from one run.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import metric_value, router, sims

__all__ = ["router", "sims"]

CLIENT_TIMEOUT_S = 60.0
"""Far above every router timeout used here: a hang shows up as a test failure, not a wait."""


@dataclass
class Tally:
    """Figures for one fault: what the clients saw, and the router's retry counter."""

    fault: str
    sent: int = 0
    ok: int = 0
    retried: int = 0
    failed: int = 0
    lost: int = 0
    streams: int = 0
    streams_cut: int = 0
    streams_cut_cleanly: int = 0
    killed_replica: int = 0
    notes: str = ""
    statuses: list[int] = field(default_factory=list, repr=False)

    def line(self) -> str:
        return (
            f"FAULT {self.fault}: sent={self.sent} ok={self.ok} retried={self.retried} "
            f"failed={self.failed} lost={self.lost} streams={self.streams} "
            f"cut={self.streams_cut} cut_cleanly={self.streams_cut_cleanly} "
            f"killed_replica={self.killed_replica}"
        )


class FaultLog:
    """Collects every test's `Tally`; printed and written at the end of the session."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tallies: list[Tally] = []

    def record(self, tally: Tally) -> None:
        print("\n" + tally.line())
        self.tallies.append(tally)
        entry = {k: v for k, v in asdict(tally).items() if k != "statuses"}
        with self.path.open("a") as sink:
            sink.write(json.dumps(entry) + "\n")


@pytest.fixture(scope="session")
def fault_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultLog]:
    log = FaultLog(tmp_path_factory.mktemp("faults") / "faults.jsonl")
    yield log
    print(f"\nfault figures ({log.path}):")
    for tally in log.tallies:
        print(tally.line() + (f" ({tally.notes})" if tally.notes else ""))


async def retries(client: httpx.AsyncClient, url: str) -> float:
    """The router's `prefix_router_retries_total` (summed over routes)."""
    text = (await client.get(url + "/metrics")).text
    return metric_value(text, "prefix_router_retries_total")


def body(i: int, head: str, *, max_tokens: int = 8, stream: bool = False) -> dict[str, Any]:
    """A chat request of tenant ``i % 8``: a long shared head and a per-request question."""
    return {
        "model": "sim-model",
        "messages": [
            {"role": "system", "content": f"tenant {i % 8} " + head},
            {"role": "user", "content": f"question {i}"},
        ],
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def post_one(
    client: httpx.AsyncClient, url: str, payload: dict[str, Any], tally: Tally
) -> str:
    """One non-streaming request; a failure counts as lost (the callers keep a worker healthy).
    Returns the worker that answered ("" on failure)."""
    tally.sent += 1
    try:
        response = await client.post(url + "/v1/chat/completions", json=payload)
    except httpx.TransportError:
        tally.failed += 1
        tally.lost += 1
        return ""
    tally.statuses.append(response.status_code)
    if response.status_code == 200 and response.json()["choices"]:
        tally.ok += 1
        return str(response.headers.get("x-prefix-router-worker", ""))
    tally.failed += 1
    tally.lost += 1
    return ""


@dataclass
class StreamResult:
    events: list[str]
    worker: str

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"

    @property
    def error(self) -> dict[str, Any] | None:
        for event in self.events:
            if event != "[DONE]":
                decoded = json.loads(event)
                if "error" in decoded:
                    return decoded["error"]  # type: ignore[no-any-return]
        return None


async def stream_one(
    client: httpx.AsyncClient, url: str, payload: dict[str, Any], tally: Tally
) -> StreamResult:
    """One streaming request, read to its end. A stream cut by a worker failure must end with
    an OpenAI-style error event and then ``[DONE]``; anything else fails the test."""
    tally.sent += 1
    tally.streams += 1
    events: list[str] = []
    async with client.stream("POST", url + "/v1/chat/completions", json=payload) as response:
        worker = response.headers.get("x-prefix-router-worker", "")
        if response.status_code != 200:
            tally.failed += 1
            tally.lost += 1
            await response.aread()
            return StreamResult([], worker)
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    result = StreamResult(events, worker)
    assert result.done, f"stream did not end with [DONE]: {events[-3:]}"
    error = result.error
    if error is None:
        tally.ok += 1
    else:
        assert {"message", "type"} <= error.keys(), error
        assert len(events) >= 2, events
        assert json.loads(events[-2]) == {"error": error}, events[-3:]
        tally.failed += 1
        tally.streams_cut += 1
        tally.streams_cut_cleanly += 1
    return result


async def gather_bounded(concurrency: int, jobs: list[Any]) -> list[Any]:
    """Await coroutines with at most ``concurrency`` running at once, results in order."""
    gate = asyncio.Semaphore(concurrency)

    async def run(job: Any) -> Any:
        async with gate:
            return await job

    return list(await asyncio.gather(*(run(job) for job in jobs)))


def client(**options: Any) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    return httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, limits=limits, **options)
