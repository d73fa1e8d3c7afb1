"""Helpers to run ``prefix-worker sim`` as a real subprocess and read its SSE streams.

Other integration tests (router against simulated workers) can reuse `running_sim` and
`read_sse`; nothing here is a pytest fixture, so importing it has no side effects.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec

from load_tests.procs import ServerProcess, console_script, start


def sim_argv(worker_id: str, *extra: str) -> list[str]:
    """argv for a simulator on 127.0.0.1 with an ephemeral port."""
    return [
        *console_script("prefix-worker"),
        "sim",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--worker-id",
        worker_id,
        *extra,
    ]


def start_sim(log_dir: Path, worker_id: str, *extra: str) -> ServerProcess:
    """Start a simulator and wait for its listening line (its stderr goes to log_dir)."""
    return start(
        f"sim-{worker_id}",
        sim_argv(worker_id, *extra),
        log_path=log_dir / f"sim-{worker_id}.log",
        timeout=30,
    )


@contextmanager
def running_sim(log_dir: Path, worker_id: str, *extra: str) -> Iterator[ServerProcess]:
    """A simulator for the duration of a ``with`` block; stopped (or reaped) afterwards."""
    proc = start_sim(log_dir, worker_id, *extra)
    try:
        yield proc
    finally:
        proc.stop()


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One ``data:`` event and when it arrived (time.monotonic)."""

    at: float
    data: str

    @property
    def done(self) -> bool:
        return self.data == "[DONE]"

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = msgspec.json.decode(self.data)
        return value


def read_sse(response: httpx.Response, limit: int | None = None) -> list[SseEvent]:
    """The ``data:`` events of a streamed response, stamped on arrival.

    With ``limit``, stops after that many events; httpx then closes the response, which the
    simulator sees as a client disconnect.
    """
    events: list[SseEvent] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(SseEvent(time.monotonic(), line[len("data: ") :]))
            if limit is not None and len(events) >= limit:
                break
    return events


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    """A chat request with one system prompt and one user turn."""
    return {
        "model": "sim-model",
        "messages": [
            {"role": "system", "content": text},
            {"role": "user", "content": "Please answer briefly."},
        ],
        **extra,
    }
