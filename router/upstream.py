"""The pooled HTTP client to workers, and the active health prober.

One `aiohttp.ClientSession` with keep-alive pools per worker serves every request. `send`
returns once the worker's response headers arrived (or raises an `UpstreamError` the caller
may retry elsewhere); the body is then read by the caller, chunk by chunk for streams, with
`read_chunk` enforcing the idle timeout between chunks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

import aiohttp

from router.config import HealthSettings, UpstreamSettings
from router.errors import UpstreamError, UpstreamTimeout
from router.routing import Router
from router.scrape import parse_engine_stats
from router.workers import Worker, WorkerPool

log = logging.getLogger("prefix_router.upstream")

RETRYABLE = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    asyncio.TimeoutError,
    ConnectionError,
)


_SESSION_HEADERS = {"User-Agent": "prefix-router", "Accept-Encoding": "identity"}


class UpstreamConnectError(UpstreamError):
    """The worker could not be reached or dropped the connection before answering."""


class Upstream:
    """Pooled keep-alive client to the workers."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=self._settings.pool_per_worker,
            keepalive_timeout=30.0,
            enable_cleanup_closed=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self._settings.connect_timeout_s, sock_read=None
            ),
            auto_decompress=True,
            # Set rather than skipped: aiohttp's skip list costs a header-dict copy and merge
            # on every request. Workers are asked not to compress (decompressing is CPU).
            headers=_SESSION_HEADERS,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Upstream.start() was not awaited")
        return self._session

    async def send(
        self, worker: Worker, path: str, body: bytes, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        """POST ``body`` to the worker; returns when its response headers are in."""
        try:
            async with asyncio.timeout(self._settings.first_byte_timeout_s):
                return await self.session.post(worker.url + path, data=body, headers=headers)
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"worker {worker.id} sent no response within "
                f"{self._settings.first_byte_timeout_s:g}s"
            ) from exc
        except (aiohttp.ClientConnectionError, ConnectionError) as exc:
            raise UpstreamConnectError(f"worker {worker.id} unreachable: {exc}") from exc

    async def read_chunk(self, response: aiohttp.ClientResponse) -> bytes:
        """Next chunk of a response body (b"" at the end), within the idle timeout."""
        content = response.content
        # What is already buffered (often the whole body, come in with the headers) needs no
        # wait, so no timer to arm and cancel; this is what `readany` would return at once.
        chunk = content.read_nowait()
        if chunk or content.is_eof():
            return chunk
        try:
            async with asyncio.timeout(self._settings.idle_timeout_s):
                return await content.readany()
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"worker stalled for over {self._settings.idle_timeout_s:g}s"
            ) from exc

    async def get(self, worker: Worker, path: str, timeout_s: float) -> tuple[int, bytes]:
        async with (
            asyncio.timeout(timeout_s),
            self.session.get(worker.url + path) as response,
        ):
            return response.status, await response.read()


async def probe_forever(router: Router, upstream: Upstream, health: HealthSettings) -> None:
    """Active health checks (``GET /health`` on every member that is due) and, every
    ``scrape_interval_s``, the engines' own ``/metrics``; forever."""
    pool = router.pool
    next_scrape = 0.0
    while True:
        due = pool.due_for_probe()
        if due:
            await asyncio.gather(*(probe_once(pool, upstream, w, health) for w in due))
        now = time.monotonic()
        if health.scrape_interval_s > 0 and now >= next_scrape:
            next_scrape = now + health.scrape_interval_s
            healthy = pool.routable()
            await asyncio.gather(*(scrape_once(router, upstream, w, health) for w in healthy))
        await asyncio.sleep(health.probe_interval_s)


async def probe_once(
    pool: WorkerPool, upstream: Upstream, worker: Worker, health: HealthSettings
) -> None:
    try:
        status, _ = await upstream.get(worker, "/health", health.probe_timeout_s)
    except (TimeoutError, aiohttp.ClientError, ConnectionError, OSError) as exc:
        pool.probe_result(worker, False, f"health probe: {type(exc).__name__}")
        return
    if status == 200:
        pool.probe_result(worker, True)
    else:
        pool.probe_result(worker, False, f"health probe: HTTP {status}")


async def scrape_once(
    router: Router, upstream: Upstream, worker: Worker, health: HealthSettings
) -> None:
    """Read one worker's ``/metrics``; a failed scrape is not a health failure (the probe
    decides health), it only leaves the previous report to age out."""
    try:
        status, body = await upstream.get(worker, "/metrics", health.probe_timeout_s)
        if status != 200:
            return
        stats = parse_engine_stats(body.decode("utf-8", "replace"), time.monotonic())
    except (TimeoutError, aiohttp.ClientError, ConnectionError, OSError, ValueError):
        log.debug("metrics scrape failed", extra={"fields": {"worker": worker.id}})
        return
    router.engine_report(worker, stats)
