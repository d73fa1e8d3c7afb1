"""What clients and operators read when something is refused or explained: the error
hierarchy and its OpenAI-style bodies, the admin token check, and the dry-run explanation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from router.admin import explain
from router.app import create_app
from router.config import load_settings
from router.core.model import Decision, WorkerId
from router.errors import (
    BadRequest,
    BodyTooLarge,
    MethodNotAllowed,
    NoHealthyWorker,
    NotFound,
    RateLimited,
    RouterError,
    ShuttingDown,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
    error_body,
    error_bytes,
)
from router.http_server import RouterAppRunner

STATUS = [
    (BadRequest, 400, "invalid_request_error", None),
    (BodyTooLarge, 413, "invalid_request_error", "request_too_large"),
    (Unauthorized, 401, "authentication_error", "invalid_api_key"),
    (NotFound, 404, "not_found_error", "not_found"),
    (MethodNotAllowed, 405, "invalid_request_error", "method_not_allowed"),
    (RateLimited, 429, "rate_limit_error", "rate_limit_exceeded"),
    (NoHealthyWorker, 503, "service_unavailable", "no_healthy_worker"),
    (ShuttingDown, 503, "service_unavailable", "shutting_down"),
    (UpstreamError, 502, "upstream_error", "upstream_error"),
    (UpstreamTimeout, 504, "upstream_error", "upstream_timeout"),
]


@pytest.mark.parametrize(("cls", "status", "type_", "code"), STATUS)
def test_each_error_has_its_status_type_and_code(
    cls: type[RouterError], status: int, type_: str, code: str | None
) -> None:
    """Every router error answers with the documented HTTP status and OpenAI type and code."""
    error = cls("something went wrong", param="field")
    assert isinstance(error, RouterError)
    assert error.status == status
    assert error.body() == {
        "error": {"message": "something went wrong", "type": type_, "param": "field", "code": code}
    }
    assert str(error) == "something went wrong"


def test_hierarchy_lets_callers_catch_families() -> None:
    """A too-large body is a bad request, and an upstream timeout is an upstream error."""
    assert issubclass(BodyTooLarge, BadRequest)
    assert issubclass(UpstreamTimeout, UpstreamError)
    assert not issubclass(NoHealthyWorker, UpstreamError)


def test_upstream_timeout_is_also_an_asyncio_timeout() -> None:
    """Code that handles asyncio timeouts also handles the router's upstream timeout."""
    with pytest.raises(asyncio.TimeoutError):
        raise UpstreamTimeout("worker stalled")
    with pytest.raises(TimeoutError):
        raise UpstreamTimeout("worker stalled")


def test_error_bytes_is_the_openai_json_body() -> None:
    """The serialized body parses as {"error": {message, type, param, code}}."""
    payload = json.loads(error_bytes(BadRequest("'model' must be a string", param="model")))
    assert payload == {
        "error": {
            "message": "'model' must be a string",
            "type": "invalid_request_error",
            "param": "model",
            "code": None,
        }
    }


def test_error_body_accepts_numeric_codes() -> None:
    """Mid-stream error events may carry an HTTP status as their code."""
    assert error_body("worker failed", "upstream_error", 502) == {
        "error": {"message": "worker failed", "type": "upstream_error", "param": None, "code": 502}
    }


# authentication over the wire -----------------------------------------------------------------

ADMIN_TOKEN = "admin-s3cret"
CLIENT_KEY = "sk-client-key"


def _app() -> web.Application:
    settings = load_settings(
        env={},
        overrides={
            "server": {"admin_token": ADMIN_TOKEN, "admin_on_public_port": True, "port": 0},
            "workers": [{"url": "http://127.0.0.1:9"}],
            "tenants": {"salt_secret": "s", "api_keys": [{"tenant": "acme", "key": CLIENT_KEY}]},
            "health": {"probe_interval_s": 60},
        },
    )
    return create_app(settings)


@pytest.fixture
async def router_port() -> AsyncIterator[int]:
    runner = RouterAppRunner(_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        assert runner.addresses
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def _raw_request(port: int, head: bytes) -> tuple[int, dict[str, object]]:
    """Send a hand-written request (header bytes need not be UTF-8); return status and JSON."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    header, _, body = raw.partition(b"\r\n\r\n")
    status = int(header.split(b" ", 2)[1])
    return status, json.loads(body)


def _head(method: bytes, path: bytes, authorization: bytes | None, body: bytes = b"") -> bytes:
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: router", b"Connection: close"]
    if authorization is not None:
        lines.append(b"Authorization: " + authorization)
    lines.append(b"Content-Type: application/json")
    lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@pytest.mark.parametrize(
    "authorization",
    [None, b"Bearer wrong", b"Basic " + ADMIN_TOKEN.encode(), b"Bearer \xff\xfe", b"Bearer \xc3"],
)
async def test_wrong_admin_token_is_401(router_port: int, authorization: bytes | None) -> None:
    """A missing, wrong or non-UTF-8 admin token answers 401 with an OpenAI-style body."""
    status, body = await _raw_request(router_port, _head(b"GET", b"/admin/workers", authorization))
    assert status == 401
    assert body["error"] == {
        "message": "admin API: missing or wrong admin token",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_api_key",
    }


async def test_right_admin_token_lists_workers(router_port: int) -> None:
    """The configured admin token opens the admin API."""
    status, body = await _raw_request(
        router_port, _head(b"GET", b"/admin/workers", b"Bearer " + ADMIN_TOKEN.encode())
    )
    assert status == 200
    workers = body["workers"]
    assert isinstance(workers, list)
    assert [w["id"] for w in workers] == ["127.0.0.1:9"]


@pytest.mark.parametrize("authorization", [b"Bearer \xff\xfe", b"Bearer sk-\xc3\x28"])
async def test_non_utf8_client_key_is_401(router_port: int, authorization: bytes) -> None:
    """A client key with bytes that are not UTF-8 is an incorrect key (401), not a 500."""
    body = json.dumps({"model": "m", "prompt": "hi"}).encode()
    status, answer = await _raw_request(
        router_port, _head(b"POST", b"/v1/completions", authorization, body)
    )
    assert status == 401
    error = answer["error"]
    assert isinstance(error, dict)
    assert error["message"] == "incorrect API key provided"


# dry-run explanation ------------------------------------------------------------------------


def _decision(reason: str, **fields: object) -> Decision:
    values: dict[str, object] = {
        "worker": WorkerId("w2"),
        "reason": reason,
        "matched_blocks": 6,
        "best_available_blocks": 9,
        "affinity_worker": WorkerId("w1"),
        "cap": 4,
        "total_blocks": 10,
    }
    values.update(fields)
    return Decision(**values)  # type: ignore[arg-type]


def test_explain_warm_names_worker_match_and_cap() -> None:
    """A warm decision says which worker holds how much of the prompt, and the cap."""
    text = explain(_decision("warm", matched_blocks=9), cap=4)
    assert "w2" in text
    assert "9 of 10 blocks" in text
    assert "(4)" in text


def test_explain_spill_says_the_preferred_worker_was_full() -> None:
    """A spill says the cap was hit and how much warmth was given up."""
    text = explain(_decision("spill"), cap=4)
    assert "load cap (4)" in text
    assert "spilled to w2" in text
    assert "warm blocks there: 6" in text
    assert "best anywhere: 9" in text


def test_explain_affinity_and_fallback() -> None:
    """Affinity names the ring owner and the best match; fallback says no prefix applied."""
    affinity = explain(
        _decision("affinity", best_available_blocks=1, affinity_worker=WorkerId("w2")), cap=3
    )
    assert "best: 1 blocks" in affinity
    assert "w2 owns the prefix" in affinity
    second = explain(_decision("affinity", best_available_blocks=1), cap=3)
    assert "w2 is less loaded than the ring owner w1" in second
    fallback = explain(_decision("fallback"), cap=3)
    assert "chose w2" in fallback
