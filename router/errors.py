"""Every error the router can answer with, and its OpenAI-style body.

    RouterError                      (status, type, code)
    ├── BadRequest                   400 invalid_request_error
    │   ├── BodyTooLarge             413 invalid_request_error / request_too_large
    │   ├── MalformedRequest         400 invalid_request_error / malformed_request
    │   ├── RequestLineTooLong       414 invalid_request_error / request_line_too_long
    │   └── HeadersTooLarge          431 invalid_request_error / headers_too_large
    ├── Unauthorized                 401 authentication_error / invalid_api_key
    ├── NotFound                     404 not_found_error
    ├── MethodNotAllowed             405 invalid_request_error
    ├── RateLimited                  429 rate_limit_error / rate_limit_exceeded (+ Retry-After)
    ├── NoHealthyWorker              503 service_unavailable / no_healthy_worker
    ├── ShuttingDown                 503 service_unavailable / shutting_down
    ├── UpstreamError                502 upstream_error
    │   └── UpstreamTimeout          504 upstream_timeout   (also an asyncio.TimeoutError)
    └── IndexUnavailable             never sent: the shared warm index is down, so routing
                                     falls back to the ring (counted in metrics)

The middleware in `router.app` turns any `RouterError` into
``{"error": {"message", "type", "param", "code"}}`` with its status; anything else becomes a
500 with a generic message (the details go to the log, never to the client).
`MalformedRequest`, `RequestLineTooLong` and `HeadersTooLarge` are HTTP-level: mostly requests
aiohttp's parser refuses before any handler runs, which `router.http_server` answers with them.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import msgspec


class RouterError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)

    def headers(self) -> dict[str, str]:
        """Response headers that go with this error (``Retry-After`` for a 429)."""
        return {}


class BadRequest(RouterError):
    status = 400
    type = "invalid_request_error"


class BodyTooLarge(BadRequest):
    status = 413
    code = "request_too_large"


class MalformedRequest(BadRequest):
    """Not a well-formed HTTP/1.1 request (request line, a header, or the body's framing)."""

    code = "malformed_request"


class RequestLineTooLong(BadRequest):
    status = 414
    code = "request_line_too_long"


class HeadersTooLarge(BadRequest):
    status = 431
    code = "headers_too_large"


class Unauthorized(RouterError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(RouterError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class MethodNotAllowed(RouterError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RateLimited(RouterError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class NoHealthyWorker(RouterError):
    status = 503
    type = "service_unavailable"
    code = "no_healthy_worker"


class ShuttingDown(RouterError):
    status = 503
    type = "service_unavailable"
    code = "shutting_down"


class UpstreamError(RouterError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamError, asyncio.TimeoutError):
    status = 504
    code = "upstream_timeout"


class IndexUnavailable(RouterError):
    """The shared warm index cannot answer now (down, or backing off before a reconnect)."""

    status = 503
    type = "service_unavailable"
    code = "index_unavailable"


def error_body(
    message: str, type_: str, code: str | int | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_bytes(error: RouterError) -> bytes:
    return msgspec.json.encode(error.body())


class TuningNotShared(RouterError):
    """A fleet-wide threshold change could not be written to Redis; nothing changed."""

    status = 503
    type = "service_unavailable"
    code = "tuning_not_shared"
