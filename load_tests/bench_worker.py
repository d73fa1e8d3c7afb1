"""An instant OpenAI-style upstream for the router overhead benchmark (`load_tests.bench`).

The benchmark measures what the router adds, so the worker behind it must cost next to
nothing: this one answers every ``POST`` at once with a fixed non-streaming chat completion
(usage with ``prompt_tokens_details.cached_tokens``, so the router's usage path runs as in
production) and every ``GET /health`` with ``{"status": "ok"}``. It is a raw asyncio protocol
on uvloop with a minimal HTTP/1.1 parser (keep-alive, pipelining, ``Content-Length`` bodies
only), several times cheaper per request than an aiohttp app or the simulator, whose
tokenizer and cache model would otherwise dominate the figures on a 2-core machine.

    python -m load_tests.bench_worker --port 0 --worker-id w0

prints ``listening http://HOST:PORT`` once it accepts connections (like our servers), and
exits on SIGTERM or SIGINT. ``prompt_tokens`` is the body's length / 4; ``cached_tokens`` is
that rounded down to 16-token blocks, minus one block (a warm head, a cold tail).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from typing import cast

from worker.announce import announce_until_stopped

_HEAD_END = b"\r\n\r\n"
_CHAT = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"bench-model",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},'
    b'"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":%d,"completion_tokens":1,"total_tokens":%d,'
    b'"prompt_tokens_details":{"cached_tokens":%d}}}'
)
_HEALTH = b'{"status":"ok"}'
_NOT_FOUND = b'{"error":{"message":"not found","type":"invalid_request_error","code":404}}'


def _response(status: bytes, body: bytes, worker_id: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
        b"x-worker-id: " + worker_id + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )


def chat_body(body_len: int) -> bytes:
    """The completion answered to a request body of ``body_len`` bytes."""
    prompt = body_len // 4
    cached = max(0, (prompt // 16 - 1) * 16)
    return _CHAT % (prompt, prompt + 1, cached)


def _content_length(head: bytes) -> int:
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    end = lower.find(b"\r\n", at + 2)
    return int(lower[at + 17 : end if end >= 0 else None].strip())


class InstantWorker(asyncio.Protocol):
    """One client connection: parse requests as they complete, answer each at once."""

    def __init__(self, worker_id: bytes) -> None:
        self._worker_id = worker_id
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        start = 0
        while True:
            head_end = buffer.find(_HEAD_END, start)
            if head_end < 0:
                break
            head = buffer[start:head_end]
            try:
                length = _content_length(head)
            except ValueError:
                out.append(_response(b"400 Bad Request", _NOT_FOUND, self._worker_id))
                start = len(buffer)
                break
            body_end = head_end + 4 + length
            if body_end > len(buffer):
                break
            out.append(self._answer(head, length))
            start = body_end
        self._buffer = buffer[start:]
        if out and self._transport is not None:
            self._transport.write(b"".join(out))

    def _answer(self, head: bytes, length: int) -> bytes:
        line_end = head.find(b"\r\n")
        method, _, rest = head[: line_end if line_end >= 0 else None].partition(b" ")
        path = rest.partition(b" ")[0]
        if method == b"POST":
            return _response(b"200 OK", chat_body(length), self._worker_id)
        if path == b"/health":
            return _response(b"200 OK", _HEALTH, self._worker_id)
        return _response(b"404 Not Found", _NOT_FOUND, self._worker_id)


async def serve(host: str, port: int, worker_id: str) -> None:
    loop = asyncio.get_running_loop()
    ident = worker_id.encode()
    server = await loop.create_server(
        lambda: InstantWorker(ident), host, port, reuse_address=True, backlog=1024
    )
    sock = server.sockets[0]
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    bound_host, bound_port = sock.getsockname()[:2]
    try:
        await announce_until_stopped(bound_host, bound_port)
    finally:
        server.close()
        await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.bench_worker")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--worker-id", default="w0")
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.host, args.port, args.worker_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
