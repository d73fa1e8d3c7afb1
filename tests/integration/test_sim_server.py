"""``prefix-worker sim`` as a real process: vLLM's API, prefix-cache usage, streaming, metrics."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from load_tests.procs import ServerProcess
from tests.integration.sim_fixtures import chat_body, read_sse, running_sim

SYSTEM = "You are a meticulous assistant. Follow the house rules. " * 40  # ~560 tokens
PREFILL_US = 50.0


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_dir = tmp_path_factory.mktemp("sim-server")
    with running_sim(
        log_dir, "w-api", "--block-size", "16", "--prefill-us-per-token", str(PREFILL_US)
    ) as proc:
        yield proc


@pytest.fixture
def client(sim: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=10.0) as http:
        assert http.post("/sim/reset").status_code == 200
        yield http


def cached_tokens(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    value: int = response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    return value


def test_a_repeated_prefix_reports_cached_tokens(client: httpx.Client) -> None:
    """The second chat with the same system prompt reports most of its prompt as cached."""
    first = client.post("/v1/chat/completions", json=chat_body(SYSTEM, max_tokens=4))
    assert cached_tokens(first) == 0
    second = client.post("/v1/chat/completions", json=chat_body(SYSTEM, max_tokens=4))
    usage = second.json()["usage"]
    assert cached_tokens(second) > 0.9 * usage["prompt_tokens"]
    assert cached_tokens(second) % 16 == 0
    assert (
        usage["total_tokens"]
        == usage["prompt_tokens"] + usage["completion_tokens"]
        == (usage["prompt_tokens"] + 4)
    )


def test_a_different_cache_salt_reports_no_cached_tokens(client: httpx.Client) -> None:
    """The same prompt under another tenant's salt gets no hit; under its own salt it does."""
    salted = chat_body(SYSTEM, max_tokens=2, cache_salt="tenant-a")
    assert cached_tokens(client.post("/v1/chat/completions", json=salted)) == 0
    other = chat_body(SYSTEM, max_tokens=2, cache_salt="tenant-b")
    assert cached_tokens(client.post("/v1/chat/completions", json=other)) == 0
    unsalted = chat_body(SYSTEM, max_tokens=2)
    assert cached_tokens(client.post("/v1/chat/completions", json=unsalted)) == 0
    assert cached_tokens(client.post("/v1/chat/completions", json=salted)) > 0


def test_completions_accept_text_and_token_ids(client: httpx.Client) -> None:
    """/v1/completions returns a text_completion with usage for text and token-id prompts."""
    text = client.post("/v1/completions", json={"prompt": SYSTEM, "max_tokens": 3})
    assert text.status_code == 200
    body = text.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["usage"]["completion_tokens"] == 3
    assert len(body["choices"][0]["text"]) == 12
    ids = client.post("/v1/completions", json={"prompt": list(range(100)), "max_tokens": 1})
    assert ids.json()["usage"]["prompt_tokens"] == 100


def test_stream_tokens_arrive_incrementally(client: httpx.Client) -> None:
    """With 300 tokens to generate, the first chunk arrives long before the last one."""
    body = chat_body("short", max_tokens=300, stream=True)
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_sse(response)
    assert events[-1].done
    chunks = [e.json() for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:]]
    assert len(contents) == 300
    # 300 tokens at 1.5 ms each take ~0.45 s; the first chunk must not wait for them.
    assert events[-1].at - events[0].at > 0.25
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" not in c for c in chunks)


def stream_chat(client: httpx.Client, text: str, **extra: Any) -> list[dict[str, Any]]:
    body = chat_body(text, max_tokens=3, stream=True, **extra)
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = read_sse(response)
    assert events[-1].done
    return [e.json() for e in events[:-1]]


def test_usage_chunk_only_when_include_usage(client: httpx.Client) -> None:
    """A final choices-empty usage chunk appears only with stream_options.include_usage."""
    plain = stream_chat(client, "first usage test")
    assert all("usage" not in c for c in plain)
    assert len(plain) == 4  # role + 3 tokens
    with_usage = stream_chat(client, "second usage test", stream_options={"include_usage": True})
    assert len(with_usage) == 5
    final = with_usage[-1]
    assert final["choices"] == []
    prompt_tokens = final["usage"]["prompt_tokens"]
    assert final["usage"] == {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + 3,
        "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_cached_prompts_get_their_first_token_sooner(client: httpx.Client) -> None:
    """TTFT of a 4000-token prompt drops from its prefill time to about one step when cached."""
    prompt = "x" * 16000  # 4000 tokens: 200 ms of prefill at 50 us/token

    def ttft() -> float:
        body = {"prompt": prompt, "max_tokens": 2, "stream": True}
        start = time.monotonic()
        with client.stream("POST", "/v1/completions", json=body) as response:
            first = read_sse(response)[0]
        return first.at - start

    cold, warm = ttft(), ttft()
    assert cold > 0.15
    assert warm < cold / 3


def test_metrics_use_vllm_names_and_counters_move(client: httpx.Client) -> None:
    """/metrics exposes vLLM's metric names; prefix-cache and token counters grow with use."""

    def counter(text: str, name: str) -> float:
        match = re.search(
            rf'^{re.escape(name)}{{engine="0",model_name="sim-model"}} (\S+)$', text, re.M
        )
        assert match, name
        return float(match.group(1))

    before = client.get("/metrics")
    assert before.headers["content-type"].startswith("text/plain")
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:request_success_total",
        "vllm:cache_config_info",
    ):
        assert name in before.text
    assert re.search(
        r'vllm:cache_config_info\{[^}]*block_size="16"[^}]*num_gpu_blocks="2048"', before.text
    )
    for _ in range(2):
        client.post("/v1/chat/completions", json=chat_body(SYSTEM, max_tokens=5))
    after = client.get("/metrics").text
    assert counter(after, "vllm:prefix_cache_queries_total") > 1000
    assert counter(after, "vllm:prefix_cache_hits_total") > 500
    assert counter(after, "vllm:generation_tokens_total") == 10
    assert counter(after, "vllm:time_to_first_token_seconds_count") == 2
    assert (
        'vllm:request_success_total{engine="0",finished_reason="length",model_name="sim-model"} 2.0'
        in after
    )


@pytest.mark.parametrize(
    ("path", "body", "status", "err_type"),
    [
        ("/v1/chat/completions", b"{not json", 400, "Bad Request"),
        ("/v1/chat/completions", b'{"model": "sim-model"}', 400, "Bad Request"),
        (
            "/v1/chat/completions",
            b'{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}',
            404,
            "NotFoundError",
        ),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 40000}', 400, "BadRequestError"),
        ("/v1/completions", b'{"prompt": "x", "n": 3}', 400, "BadRequestError"),
    ],
)
def test_bad_requests_get_vllm_errors(
    client: httpx.Client, path: str, body: bytes, status: int, err_type: str
) -> None:
    """Malformed bodies, unknown models and over-long requests get vLLM's error object."""
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == err_type
    assert error["code"] == status


def test_every_response_names_the_worker(client: httpx.Client) -> None:
    """x-worker-id is on successes, errors, streams and unknown paths alike."""
    responses = [
        client.get("/health"),
        client.get("/v1/models"),
        client.get("/version"),
        client.get("/metrics"),
        client.get("/sim/state"),
        client.get("/no/such/path"),
        client.post("/v1/completions", content=b"[]"),
        client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "stream": True}),
    ]
    assert [r.headers.get("x-worker-id") for r in responses] == ["w-api"] * len(responses)


def test_info_endpoints_have_vllm_shapes(client: httpx.Client) -> None:
    """/health is 200, /v1/models lists the served model, /version reports a version."""
    assert client.get("/health").status_code == 200
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["sim-model"]
    assert models["data"][0]["max_model_len"] == 32768
    assert models["data"][0]["owned_by"] == "vllm"
    assert "version" in client.get("/version").json()


def test_request_log_keeps_trace_headers_but_not_credentials(client: httpx.Client) -> None:
    """/sim/requests shows traceparent and x-request-id, and only whether authorization was set."""
    headers = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "x-request-id": "req-42",
        "authorization": "Bearer secret-token",
    }
    body = {"prompt": "hello", "max_tokens": 1, "cache_salt": "s1"}
    response = client.post("/v1/completions", json=body, headers=headers)
    assert response.json()["id"] == "cmpl-req-42"
    client.post("/v1/completions", json={"prompt": "again", "max_tokens": 1})
    records = client.get("/sim/requests", params={"limit": 2}).json()["requests"]
    assert len(records) == 2
    first = records[0]
    assert first["path"] == "/v1/completions"
    assert first["cache_salt"] == "s1"
    assert first["cached_tokens"] == 0
    assert first["headers"] == {
        "traceparent": headers["traceparent"],
        "x-request-id": "req-42",
        "authorization": True,
    }
    assert "secret-token" not in client.get("/sim/requests").text
    assert records[1]["headers"]["authorization"] is False


def test_state_reports_cache_and_queues(client: httpx.Client) -> None:
    """/sim/state counts requests and shows cached blocks left behind by finished requests."""
    client.post("/v1/completions", json={"prompt": "y" * 640, "max_tokens": 1})
    state = client.get("/sim/state").json()
    assert state["worker_id"] == "w-api"
    assert state["requests_total"] == 1
    assert state["cached_blocks"] == 10
    assert (state["running"], state["waiting"], state["used_blocks"]) == (0, 0, 0)
    client.post("/sim/reset")
    assert client.get("/sim/state").json()["cached_blocks"] == 0


def test_a_client_that_disconnects_mid_stream_frees_its_slot(client: httpx.Client) -> None:
    """Closing a stream early aborts the request: running and used blocks drop back to 0."""
    body = {"prompt": "z" * 400, "max_tokens": 2000, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        # islice leaves the line iterator open, so the stream stays open while we look.
        events = list(itertools.islice((x for x in lines if x.startswith("data: ")), 2))
        assert len(events) == 2
        assert client.get("/sim/state").json()["running"] == 1
    deadline = time.monotonic() + 5
    state = client.get("/sim/state").json()
    while (state["running"], state["used_blocks"]) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.02)
        state = client.get("/sim/state").json()
    assert (state["running"], state["used_blocks"], state["reserved_blocks"]) == (0, 0, 0)


def test_sigterm_stops_the_simulator_cleanly(tmp_path: Path) -> None:
    """SIGTERM ends the process with exit code 0."""
    with running_sim(tmp_path, "w-term") as proc:
        assert httpx.get(f"{proc.url}/health").status_code == 200
        assert proc.stop() == 0
