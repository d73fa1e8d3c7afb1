"""A bare aiohttp + uvloop pass-through proxy: the benchmark's reference for "what one Python
process can forward at all", measured in the same run as our router.

It does the least a proxy must: read the body, POST it to the next worker (round robin over
pooled keep-alive connections), read the answer, send it back. No parsing, routing, metrics
or logs; so the gap between it and our router is what routing costs, and the gap between it
and a native peer is what Python costs.

    python -m load_tests.bench_bare --port 0 --worker URL [--worker URL ...]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from worker.announce import announce_until_stopped

_SESSION = web.AppKey("session", aiohttp.ClientSession)
_HEADERS = {"Content-Type": "application/json"}


def build_app(workers: list[str]) -> web.Application:
    turn = itertools.cycle(workers)

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        session = request.app[_SESSION]
        async with session.post(next(turn) + request.path, data=body, headers=_HEADERS) as up:
            raw = await up.read()
            return web.Response(body=raw, status=up.status, content_type="application/json")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[_SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024))
        yield
        await app[_SESSION].close()

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", forward)
    app.router.add_post("/v1/completions", forward)
    app.cleanup_ctx.append(session_ctx)
    return app


async def _serve(host: str, port: int, workers: list[str]) -> None:
    runner = web.AppRunner(build_app(workers), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    bound_host, bound_port = runner.addresses[0][:2]
    try:
        await announce_until_stopped(bound_host, bound_port)
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.bench_bare")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--worker", action="append", required=True, metavar="URL")
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(_serve(args.host, args.port, [w.rstrip("/") for w in args.worker]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
