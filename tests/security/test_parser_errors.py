"""Requests aiohttp's HTTP parser refuses get the router's OpenAI-style JSON errors too.

The router is served in-process exactly as ``prefix-router serve`` serves it (`router.cli`'s
runner, public and admin listeners) on 127.0.0.1, and malformed requests go over raw sockets:
each must get its status (414 / 431 / 400), ``Content-Type: application/json``, the
``{"error": {"message", "type", "param", "code"}}`` body without an echo of the input,
``Connection: close`` and a closed connection, and the router must serve the next request.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong

from router.app import create_admin_app, create_app
from router.cli import _runner
from router.config import Settings, load_settings
from router.http_server import JsonErrorRequestHandler, JsonErrorServer

ADMIN_TOKEN = "parser-admin-token"
TIMEOUT_S = 5.0
CHAT = b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\n"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool

    def error(self) -> dict[str, Any]:
        payload = json.loads(self.body)
        assert set(payload) == {"error"}
        error: dict[str, Any] = payload["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str)
        assert error["message"]
        return error


def _settings(**server: Any) -> Settings:
    return load_settings(
        env={},
        overrides={
            "server": {"port": 0, "admin_token": ADMIN_TOKEN, "admin_port": 0, **server},
            "workers": [{"url": "http://127.0.0.1:9"}],
            "tenants": {"salt_secret": "parser-errors"},
            "health": {"probe_interval_s": 60},
            "telemetry": {"access_log": False},
        },
    )


@dataclass
class Listeners:
    public: int
    admin: int
    runner: web.AppRunner


async def _serve(settings: Settings) -> tuple[Listeners, list[web.AppRunner]]:
    app = create_app(settings)
    runners = [_runner(app, settings, 1.0), _runner(create_admin_app(app), settings, 1.0)]
    ports = []
    for runner in runners:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        ports.append(int(runner.addresses[0][1]))
    return Listeners(ports[0], ports[1], runners[0]), runners


@pytest.fixture
async def router() -> AsyncIterator[Listeners]:
    listeners, runners = await _serve(_settings())
    try:
        yield listeners
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def _read_answer(reader: asyncio.StreamReader) -> Answer:
    """One response (by Content-Length), and whether the server closed the connection after."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT_S)
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith(("HTTP/1.1 ", "HTTP/1.0 ")), lines[0]
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), TIMEOUT_S)
    closed = headers.get("connection", "").lower() == "close"
    if closed:
        try:
            rest = await asyncio.wait_for(reader.read(), TIMEOUT_S)
        except ConnectionResetError:
            rest = b""
        assert rest == b"", f"bytes after a closing answer: {rest[:80]!r}"
    return Answer(int(lines[0][9:12]), headers, body, closed)


async def _exchange(port: int, request: bytes) -> Answer:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await _read_answer(reader)
    finally:
        writer.close()
        await writer.wait_closed()


async def _health_is_served(port: int) -> bool:
    answer = await _exchange(port, b"GET /health HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n")
    return answer.status == 200


async def _chunked_chat_in_handler(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose chunked chat request is inside the router's handler, reading the
    body: its ``Expect: 100-continue`` got the interim answer, which comes from the app."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(CHAT + b"Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT_S)
        assert interim.startswith(b"HTTP/1.1 100")
    except BaseException:
        writer.close()
        raise
    return reader, writer


def _get(head: bytes = b"") -> bytes:
    return b"GET /health HTTP/1.1\r\nHost: r\r\n" + head + b"\r\n"


LONG = 9000  # over the default 8190-byte limits
MALFORMED = [
    ("long-request-line", b"GET /" + b"a" * LONG + b" HTTP/1.1\r\nHost: r\r\n\r\n",
     414, "request_line_too_long", "request line too long"),
    ("long-absolute-target", b"GET http://r/" + b"a" * LONG + b" HTTP/1.1\r\nHost: r\r\n\r\n",
     414, "request_line_too_long", "request line too long"),
    ("long-header-value", _get(b"X-Big: " + b"a" * LONG + b"\r\n"),
     431, "headers_too_large", "request header too long"),
    ("long-header-name", _get(b"X-" + b"a" * LONG + b": v\r\n"),
     431, "headers_too_large", "request header too long"),
    ("too-many-headers", _get(b"".join(b"X-H%d: v\r\n" % i for i in range(200))),
     431, "headers_too_large", "too many request headers: at most 128"),
    ("control-char-in-header", _get(b"X-A: a\x01b\r\n"),
     400, "malformed_request", "invalid header value char"),
    ("nul-in-header", _get(b"X-A: a\x00b\r\n"),
     400, "malformed_request", "invalid header value char"),
    ("control-char-in-path", b"GET /he\x01alth HTTP/1.1\r\nHost: r\r\n\r\n",
     400, "malformed_request", "invalid char in url path"),
    ("garbage-request-line", b"GARBAGE\r\n\r\n",
     400, "malformed_request", "invalid method"),
    ("invalid-method", b"G(T /health HTTP/1.1\r\nHost: r\r\n\r\n",
     400, "malformed_request", "invalid method"),
    ("tls-client-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
     400, "malformed_request", "HTTPS traffic on an HTTP port"),
    ("bad-http-version", b"GET /health HTTP/9.9\r\nHost: r\r\n\r\n",
     400, "malformed_request", "invalid HTTP version"),
    ("lf-line-endings", b"GET /health HTTP/1.1\nHost: r\n\n",
     400, "malformed_request", "expected CRLF"),
    ("header-without-colon", _get(b"NoColonHere\r\n"),
     400, "malformed_request", "invalid header token"),
    ("space-before-colon", b"GET /health HTTP/1.1\r\nHost : r\r\n\r\n",
     400, "malformed_request", "invalid header token"),
    ("obsolete-line-folding", _get(b"X-A: a\r\n b\r\n"),
     400, "malformed_request", "whitespace after header value"),
    ("missing-host", b"GET /health HTTP/1.1\r\n\r\n",
     400, "malformed_request", "missing 'Host' header"),
    ("bad-content-length", CHAT + b"Content-Length: abc\r\n\r\n",
     400, "malformed_request", "Content-Length"),
    ("duplicate-content-length", CHAT + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
     400, "malformed_request", "duplicate Content-Length"),
    ("content-length-and-chunked",
     CHAT + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
     400, "malformed_request", "Transfer-Encoding can't be present with Content-Length"),
    ("unknown-transfer-encoding", CHAT + b"Transfer-Encoding: gzip\r\n\r\n",
     400, "malformed_request", "Transfer-Encoding"),
    ("bad-chunk-size", CHAT + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
     400, "malformed_request", "chunk size"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("request_bytes", "status", "code", "says"),
    [pytest.param(*case[1:], id=case[0]) for case in MALFORMED],
)
async def test_parser_rejections_are_openai_errors(
    router: Listeners, request_bytes: bytes, status: int, code: str, says: str
) -> None:
    """A request the HTTP parser refuses gets its status and an OpenAI-style JSON error, the
    connection is closed, and the router serves the next request."""
    answer = await _exchange(router.public, request_bytes)
    assert answer.status == status
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.closed
    error = answer.error()
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, None)
    assert says in error["message"]
    # A clear message, not a copy of the client's bytes.
    assert len(answer.body) < 300
    assert b"aaaaaaaaaa" not in answer.body
    assert b"\\x" not in answer.body
    assert await _health_is_served(router.public)


async def test_the_admin_listener_answers_parser_rejections_in_json(router: Listeners) -> None:
    """The admin listener refuses malformed requests with the same JSON errors."""
    answer = await _exchange(router.admin, _get(b"X-Big: " + b"a" * LONG + b"\r\n"))
    assert (answer.status, answer.error()["code"], answer.closed) == (
        431,
        "headers_too_large",
        True,
    )
    assert answer.headers["content-type"].startswith("application/json")
    status = await _exchange(
        router.admin,
        b"GET /admin/workers HTTP/1.1\r\nHost: r\r\nConnection: close\r\n"
        b"Authorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\n\r\n",
    )
    assert status.status == 200


async def test_separate_limits_pick_414_or_431_by_the_limit_crossed() -> None:
    """With different line and header limits, each limit names its own status and size."""
    listeners, runners = await _serve(_settings(max_line_bytes=1024, max_header_bytes=2048))
    try:
        line = await _exchange(listeners.public, b"GET /" + b"a" * 1500 + b" HTTP/1.1\r\n\r\n")
        # A header value that looks like a path is still a header.
        header = await _exchange(listeners.public, _get(b"X-Path: /" + b"a" * 3000 + b"\r\n"))
        fits = await _exchange(
            listeners.public, _get(b"Connection: close\r\nX-Ok: " + b"a" * 1500 + b"\r\n")
        )
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
    assert (line.status, line.error()["code"]) == (414, "request_line_too_long")
    assert "at most 1024 bytes" in line.error()["message"]
    assert (header.status, header.error()["code"]) == (431, "headers_too_large")
    assert "at most 2048 bytes" in header.error()["message"]
    assert fits.status == 200


async def test_a_body_whose_chunk_framing_breaks_mid_request_gets_400_not_a_hang(
    router: Listeners,
) -> None:
    """A chunked body that turns malformed after the handler started reading it is answered
    400 at once and the connection closed (aiohttp alone left both sides waiting)."""
    reader, writer = await _chunked_chat_in_handler(router.public)
    try:
        writer.write(b"2\r\n{}\r\nzz\r\n")
        await writer.drain()
        answer = await _read_answer(reader)
    finally:
        writer.close()
        await writer.wait_closed()
    assert (answer.status, answer.error()["code"], answer.closed) == (
        400,
        "malformed_request",
        True,
    )
    assert await _health_is_served(router.public)


async def test_a_request_pipelined_behind_a_body_is_answered_normally(router: Listeners) -> None:
    """A good request that arrives with the end of the previous request's body is served (the
    body's end is not mistaken for a framing error)."""
    reader, writer = await _chunked_chat_in_handler(router.public)
    try:
        writer.write(b"2\r\n{}\r\n0\r\n\r\n" + _get(b"Connection: close\r\n"))
        await writer.drain()
        first = await _read_answer(reader)
        second = await _read_answer(reader)
    finally:
        writer.close()
        await writer.wait_closed()
    # The body is well framed but not a valid chat request: the router's own 400.
    assert (first.status, first.closed) == (400, False)
    assert first.error()["code"] != "malformed_request"
    assert second.status == 200


async def test_a_body_that_cannot_be_decompressed_gets_400_not_500(router: Listeners) -> None:
    """A body that is not the gzip its Content-Encoding claims is a client error (400)."""
    answer = await _exchange(
        router.public, CHAT + b"Content-Encoding: gzip\r\nContent-Length: 4\r\n\r\nabcd"
    )
    assert (answer.status, answer.error()["code"], answer.closed) == (
        400,
        "malformed_request",
        True,
    )


async def test_an_unknown_expectation_gets_417_in_json(router: Listeners) -> None:
    """An Expect header other than 100-continue, refused before any router code, is JSON too."""
    answer = await _exchange(
        router.public, CHAT + b"Expect: something\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert answer.status == 417
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.error()["code"] == 417


async def test_garbage_on_a_kept_alive_connection(router: Listeners) -> None:
    """After a good request on a kept-alive connection, malformed bytes on it get a JSON 400
    and the connection closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", router.public)
    try:
        writer.write(_get())
        await writer.drain()
        first = await _read_answer(reader)
        writer.write(b"GET /he\x01alth HTTP/1.1\r\nHost: r\r\n\r\n")
        await writer.drain()
        second = await _read_answer(reader)
    finally:
        writer.close()
        await writer.wait_closed()
    assert (first.status, first.closed) == (200, False)
    assert (second.status, second.error()["code"], second.closed) == (
        400,
        "malformed_request",
        True,
    )


async def test_routing_errors_are_json_and_keep_the_connection(router: Listeners) -> None:
    """Unknown routes (GET and HEAD) and wrong methods are JSON 404/405 on a connection that
    stays usable; HEAD answers carry no body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", router.public)
    try:
        answers = []
        for request in (
            b"GET /nope HTTP/1.1\r\nHost: r\r\n\r\n",
            b"DELETE /health HTTP/1.1\r\nHost: r\r\n\r\n",
            b"HEAD /nope HTTP/1.1\r\nHost: r\r\n\r\n",
            _get(),
        ):
            writer.write(request)
            await writer.drain()
            if request.startswith(b"HEAD"):
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT_S)
                answers.append(Answer(int(head[9:12]), {}, b"", False))
                assert b"application/json" in head
            else:
                answers.append(await _read_answer(reader))
    finally:
        writer.close()
        await writer.wait_closed()
    assert [a.status for a in answers] == [404, 405, 404, 200]
    assert answers[0].error()["type"] == "not_found_error"
    assert answers[1].error()["code"] == "method_not_allowed"
    assert not any(a.closed for a in answers)


async def test_rejections_are_still_logged(
    router: Listeners, caplog: pytest.LogCaptureFixture
) -> None:
    """Operators still see each parser rejection in the log (aiohttp's server logger)."""
    with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
        await _exchange(router.public, _get(b"X-Big: " + b"a" * LONG + b"\r\n"))
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert records
    assert any(r.exc_info and isinstance(r.exc_info[1], LineTooLong) for r in records)


async def test_the_aiohttp_internals_this_relies_on() -> None:
    """router.http_server's hooks into aiohttp are still where it expects them (an aiohttp
    upgrade that moves them fails here, not silently in production)."""
    settings = _settings(max_line_bytes=1111, max_header_bytes=2222, max_headers=33)
    runner = _runner(create_app(settings), settings, 1.0)
    await runner.setup()  # BaseRunner.setup -> AppRunner._make_server
    try:
        server = runner.server
        assert isinstance(server, JsonErrorServer)
        protocol = server()
        assert isinstance(protocol, JsonErrorRequestHandler)
        # web.Server._kwargs carried the runner's RequestHandler options through.
        assert (protocol.max_line_size, protocol.max_field_size, protocol.max_headers) == (
            1111,
            2222,
            33,
        )
        assert protocol.access_logger is None
    finally:
        await runner.cleanup()
    parameters = list(inspect.signature(web.RequestHandler.handle_error).parameters)
    assert parameters == ["self", "request", "status", "exc", "message"]
    slots = web.RequestHandler.__slots__
    assert "_current_request" in slots
    assert "_messages" in slots
    assert LineTooLong(b"/x", 8190).args[:2] == (b"/x", 8190)
