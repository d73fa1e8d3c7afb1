"""Faults injected through ``POST /sim/fault`` behave as a failing vLLM worker would."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from load_tests.procs import ServerProcess
from tests.integration.sim_fixtures import read_sse, running_sim

BODY = {"prompt": "fault test prompt", "max_tokens": 4}
STREAM_BODY = {"prompt": "fault test prompt", "max_tokens": 8, "stream": True}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_sim(tmp_path_factory.mktemp("sim-faults"), "w-faults") as proc:
        yield proc


@pytest.fixture
def client(sim: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=10.0) as http:
        assert http.post("/sim/reset").status_code == 200
        yield http


def stream_until_failure(
    client: httpx.Client, timeout: float = 10.0
) -> tuple[list[str], Exception | None]:
    """The data lines of a streamed completion, and the error that ended it (if any)."""
    lines: list[str] = []
    try:
        with client.stream("POST", "/v1/completions", json=STREAM_BODY, timeout=timeout) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
    except httpx.HTTPError as exc:
        return lines, exc
    return lines, None


def set_fault(client: httpx.Client, **fault: Any) -> None:
    response = client.post("/sim/fault", json=fault)
    assert response.status_code == 200, response.text


def test_error_fault_answers_the_status_for_count_requests(client: httpx.Client) -> None:
    """mode=error, status=503, count=2: two 503s with vLLM's error body, then normal service."""
    set_fault(client, mode="error", status=503, count=2)
    statuses = [client.post("/v1/completions", json=BODY).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    set_fault(client, mode="error", count=1)
    failed = client.post("/v1/completions", json=BODY)
    assert failed.status_code == 500
    assert failed.json()["error"]["code"] == 500
    assert failed.headers["x-worker-id"] == "w-faults"


def test_slow_fault_delays_the_response(client: httpx.Client) -> None:
    """mode=slow adds delay_ms before the worker starts on the request."""
    set_fault(client, mode="slow", delay_ms=300, count=1)
    start = time.monotonic()
    assert client.post("/v1/completions", json=BODY).status_code == 200
    assert time.monotonic() - start >= 0.3


def test_hang_fault_never_answers_until_the_client_gives_up(client: httpx.Client) -> None:
    """mode=hang: the request times out on the client; the next one is served."""
    set_fault(client, mode="hang", count=1)
    with pytest.raises(httpx.ReadTimeout):
        client.post("/v1/completions", json=BODY, timeout=0.5)
    assert client.post("/v1/completions", json=BODY).status_code == 200
    records = client.get("/sim/requests").json()["requests"]
    assert [r["fault"] for r in records] == ["hang", None]


def test_hang_after_chunks_stalls_an_open_stream(client: httpx.Client) -> None:
    """A stream with hang after 2 chunks delivers exactly 2 events, then nothing."""
    set_fault(client, mode="hang", after_chunks=2, count=1)
    events, error = stream_until_failure(client, timeout=0.5)
    assert isinstance(error, httpx.ReadTimeout)
    assert len(events) == 2


def test_error_after_chunks_ends_the_stream_with_an_error_event(client: httpx.Client) -> None:
    """A stream that fails after 3 chunks sends them, an error event, then [DONE]."""
    set_fault(client, mode="error", status=500, after_chunks=3, count=1)
    with client.stream("POST", "/v1/completions", json=STREAM_BODY) as response:
        assert response.status_code == 200
        events = read_sse(response)
    assert len(events) == 5
    assert all("choices" in e.json() for e in events[:3])
    assert events[3].json()["error"]["code"] == 500
    assert events[4].done


def test_invalid_fault_settings_are_rejected(client: httpx.Client) -> None:
    """An unknown mode is a 400 and leaves the worker healthy."""
    response = client.post("/sim/fault", json={"mode": "explode"})
    assert response.status_code == 400
    assert client.get("/sim/fault").json()["mode"] == "none"


def test_reset_clears_an_active_fault(client: httpx.Client) -> None:
    """POST /sim/reset removes a fault that had no count."""
    set_fault(client, mode="error")
    assert client.post("/v1/completions", json=BODY).status_code == 500
    client.post("/sim/reset")
    assert client.post("/v1/completions", json=BODY).status_code == 200


def test_crash_fault_kills_the_process(tmp_path: Path) -> None:
    """mode=crash: the connection drops and the process exits with code 1."""
    with running_sim(tmp_path, "w-crash") as proc, httpx.Client(base_url=proc.url) as client:
        set_fault(client, mode="crash")
        assert client.get("/health").status_code == 200
        with pytest.raises(httpx.TransportError):
            client.post("/v1/completions", json=BODY)
        assert proc.popen.wait(timeout=10) == 1


def test_crash_after_chunks_cuts_the_stream(tmp_path: Path) -> None:
    """A crash after 2 chunks leaves the client with 2 events and a broken stream."""
    with running_sim(tmp_path, "w-crash-stream") as proc, httpx.Client(base_url=proc.url) as client:
        set_fault(client, mode="crash", after_chunks=2)
        events, error = stream_until_failure(client)
        assert isinstance(error, httpx.TransportError)
        assert len(events) == 2
        assert proc.popen.wait(timeout=10) == 1
