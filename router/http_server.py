"""The router's HTTP server: aiohttp's, except that every error it answers is an OpenAI error.

aiohttp's request parser refuses a malformed request before any router code runs: a request
line over ``server.max_line_bytes``, a header over ``server.max_header_bytes``, more than
``server.max_headers`` headers, a control character, a bad method or HTTP version, broken
Content-Length / Transfer-Encoding framing, TLS sent to the plain-HTTP port. aiohttp answers
those from `RequestHandler.handle_error`: always 400, in text/plain, echoing up to 100 bytes of
the input. `JsonErrorRequestHandler` answers them with the router's error body instead
(`parser_rejection`): 414 for a long request line, 431 for a long header or too many headers,
400 otherwise, a message that names the problem without echoing the input, and
``Connection: close`` (aiohttp drops the connection after a parser error either way). aiohttp
still logs each rejection on its ``aiohttp.server`` logger (`router.telemetry` formats it).

`JsonErrorServer` also turns an ``HTTPException`` raised before the app's middlewares run
(aiohttp's ``Expect`` handling: 417) into the same JSON shape.

`RouterAppRunner` is the ``web.AppRunner`` every router listener is served with: the public
and the admin listener in `router.cli`, and tests that serve the app in-process. aiohttp has no
public hook for the protocol class, so this leans on aiohttp internals, each pinned by
``tests/security/test_parser_errors.py::test_the_aiohttp_internals_this_relies_on``:

- ``AppRunner._make_server()`` builds the ``web.Server`` (``BaseRunner.setup`` calls it);
- ``web.Server._kwargs`` holds the keyword arguments meant for each ``RequestHandler`` (the
  parser limits, the access log);
- a parser error reaches ``RequestHandler.handle_error(request, status, exc, message)`` with
  the parser's ``HttpProcessingError`` as ``exc``;
- ``RequestHandler._current_request`` (the request being handled) and ``_messages`` (the queue
  of parsed requests and parser errors), to end a body the parser gave up on
  (`JsonErrorRequestHandler.data_received`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http import RawRequestMessage
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    HttpBadRequest,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)

from router.errors import (
    HeadersTooLarge,
    MalformedRequest,
    RequestLineTooLong,
    RouterError,
    error_body,
)

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

# The parser's own wording for too many headers (both its C and its pure-Python parser).
_TOO_MANY_HEADERS = "Too many headers received"
_TLS_PREFIX = "Received HTTPS traffic"
# What the offending line of a LineTooLong starts with when it is the request target
# (origin form "/...", asterisk form "*", absolute form "http://..."), or, from aiohttp's
# pure-Python parser, the whole request line ("GET /...").
_REQUEST_TARGET = re.compile(rb"[/*]|[A-Za-z][A-Za-z0-9+.-]*://|[A-Z]+ ")
# When the parser's message does not carry llhttp's short description, say what kind of
# thing was wrong rather than repeat the message (which may quote the input).
_KINDS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (BadHttpMethod, "invalid method"),
    (BadStatusLine, "invalid request line"),
    (InvalidURLError, "invalid request target"),
    (InvalidHeader, "invalid header"),
    (PayloadEncodingError, "invalid body framing"),
)
_REASON_CHARS = 100


def parser_rejection(
    exc: HttpProcessingError, *, max_line_size: int, max_field_size: int, max_headers: int
) -> RouterError:
    """The error to answer for a request aiohttp's parser refused with ``exc``."""
    if isinstance(exc, LineTooLong):
        if _is_request_line(exc, max_line_size, max_field_size):
            return RequestLineTooLong(
                f"request line too long: the method, path and query may take at most "
                f"{max_line_size} bytes"
            )
        return HeadersTooLarge(
            f"request header too long: a header's name and value may take at most "
            f"{max_field_size} bytes"
        )
    if exc.message.startswith(_TOO_MANY_HEADERS):
        return HeadersTooLarge(f"too many request headers: at most {max_headers} are accepted")
    return MalformedRequest(f"malformed HTTP request: {_reason(exc)}")


def _is_request_line(exc: LineTooLong, max_line_size: int, max_field_size: int) -> bool:
    """Whether the line over its limit was the request line (else a header)."""
    limit = exc.args[1] if len(exc.args) > 1 else None
    if max_line_size != max_field_size and limit in (max_line_size, max_field_size):
        return bool(limit == max_line_size)
    line = exc.args[0] if exc.args else b""
    head = line[:16].encode("latin-1", "replace") if isinstance(line, str) else bytes(line[:16])
    return _REQUEST_TARGET.match(head) is not None


def _reason(exc: HttpProcessingError) -> str:
    """A short, printable reason for ``exc`` that does not quote the client's input."""
    message = exc.message
    if ":\n" in message:
        # llhttp's "description:\n\n  b'<input>'\n  ^"; a bad request line comes as
        # "Bad status line:\n  description:\n\n  ...".
        parts = message.split(":\n")
        reason = parts[1] if parts[0] == "Bad status line" and len(parts) > 2 else parts[0]
    elif type(exc) in (BadHttpMessage, HttpBadRequest) or message.startswith(_TLS_PREFIX):
        # aiohttp's own messages ("Missing 'Host' header in request.") quote no input.
        reason = message.split("\n", 1)[0]
    else:
        reason = next((kind for cls, kind in _KINDS if isinstance(exc, cls)), "bad request")
    printable = "".join(c for c in reason.strip() if " " <= c <= "~")[:_REASON_CHARS]
    first_word = printable.split(" ", 1)[0]
    if first_word.isalpha() and first_word[1:].islower():
        # "invalid header token", but "HTTP ..." and "Transfer-Encoding ..." as they are.
        printable = printable[0].lower() + printable[1:]
    return printable or "bad request"


def _json_error(body: dict[str, Any], status: int) -> web.Response:
    response = web.json_response(body, status=status, headers={"Connection": "close"})
    response.force_close()
    return response


class JsonErrorRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, answering the errors it raises itself in JSON."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        request = self._current_request
        queued = len(self._messages)
        super().data_received(data)
        if request is None or len(self._messages) <= queued:
            return
        if isinstance(self._messages[-1][0], RawRequestMessage) or request.content.is_eof():
            return
        # The parser failed inside the body of the request being handled (a broken chunk
        # header, say). aiohttp queues a 400 for after the handler, but drops the body stream
        # without an error, so the handler would wait for the rest of the body forever while
        # the client waits for an answer. End the body with the error the parser would have
        # given it: the app's error middleware answers 400 and closes the connection. (At EOF
        # too: aiohttp then skips draining the rest, which would only raise the error again.)
        request.content.set_exception(
            web.RequestPayloadError("the request body's framing is invalid")
        )
        request.content.feed_eof()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own handling first: it logs the error as it always has, and raises
        # ConnectionError if part of a response already went out (then nothing can be said).
        super().handle_error(request, status, exc, message)
        if isinstance(exc, HttpProcessingError):
            error = parser_rejection(
                exc,
                max_line_size=self.max_line_size,
                max_field_size=self.max_field_size,
                max_headers=self.max_headers,
            )
            return _json_error(error.body(), error.status)
        if status >= 500:
            # A handler's exception that got past the middlewares (500) or a handler timeout
            # (504): the details are in the log, never in the answer.
            return _json_error(error_body("internal router error", "server_error", status), status)
        return _json_error(error_body(_phrase(status), "invalid_request_error", status), status)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "request refused"


def _json_http_exceptions(handler: Handler) -> Handler:
    """``handler``, with an ``HTTPException`` (4xx) it raises answered as an OpenAI error.

    The app's error middleware does this for everything inside it; this catches what aiohttp
    raises before the middlewares run (the ``Expect`` header's 417)."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            body = error_body(exc.reason, "invalid_request_error", exc.status)
            return _json_error(body, exc.status)

    return handle


class JsonErrorServer(web.Server):
    """``web.Server`` whose connections are `JsonErrorRequestHandler`s."""

    def __init__(
        self,
        handler: Handler,
        *,
        request_factory: Callable[..., web.BaseRequest] | None = None,
        handler_cancellation: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            _json_http_exceptions(handler),
            request_factory=request_factory,
            handler_cancellation=handler_cancellation,
            loop=loop,
            **kwargs,
        )
        self._handler_loop = loop or asyncio.get_running_loop()
        self._handler_kwargs = kwargs

    def __call__(self) -> web.RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._handler_loop, **self._handler_kwargs)


class RouterAppRunner(web.AppRunner):
    """``web.AppRunner`` serving the app through `JsonErrorServer`; same arguments."""

    __slots__ = ()

    async def _make_server(self) -> web.Server:
        # aiohttp's runner starts the app and builds its server (handler, request factory and
        # the RequestHandler options); serve the same with the JSON-answering handler.
        server = await super()._make_server()
        return JsonErrorServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            **server._kwargs,
        )
