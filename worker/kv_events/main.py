"""The sidecar as a process: JSON logs on stderr, the metrics endpoint, signals.

`run_sidecar` connects the Redis warm index (it never fails at start: a Redis that is down is
retried in the background), starts the sidecar, logs one JSON line with ``"event":
"subscribed"`` (the address in use, a bound port included, and the metrics URL), serves
``/metrics`` and ``/health`` when ``metrics_port`` is set, and on SIGTERM or SIGINT applies
what is queued (within ``drain_timeout_s``) and returns 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics

from router.index.redis import RedisWarmIndex
from router.telemetry import JsonFormatter
from worker.kv_events.sidecar import KvEventsSidecar, SidecarConfig, SidecarMetrics

logger = logging.getLogger("worker.kv_events")

PREDICTED_TTL_S = 60.0
"""Unused here (the sidecar records only confirmed blocks), but the index needs a value."""
STATS_INTERVAL_S = 3600.0
"""The index refreshes per-worker counts for routers' metrics; the sidecar has no use for them."""


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("worker", "prefix_router"):
        root = logging.getLogger(name)
        root.handlers[:] = [handler]
        root.setLevel(level.upper())
        root.propagate = False


def redacted(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + netloc).geturl()


async def _serve_metrics(metrics: SidecarMetrics, host: str, port: int) -> web.AppRunner:
    async def scrape(request: web.Request) -> web.Response:
        response = web.Response(body=metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def run_sidecar(config: SidecarConfig) -> int:
    """Run until SIGTERM/SIGINT; 0 on a clean stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    disable_created: Callable[[], None] = disable_created_metrics  # untyped upstream
    disable_created()  # the *_created series double the output; nothing reads them
    metrics = SidecarMetrics(config.worker_id)
    index = RedisWarmIndex(
        config.redis_url,
        prefix=config.prefix,
        capacity_blocks=config.capacity_blocks,
        predicted_ttl_s=PREDICTED_TTL_S,
        stats_interval_s=STATS_INTERVAL_S,
    )
    await index.start()
    sidecar = KvEventsSidecar(config, index, metrics)
    runner: web.AppRunner | None = None
    try:
        await sidecar.start()
        metrics_url = None
        if config.metrics_port is not None:
            runner = await _serve_metrics(metrics, config.metrics_host, config.metrics_port)
            host, port = runner.addresses[0][:2]
            metrics_url = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
        fields = {
            "event": "subscribed",
            "worker": config.worker_id,
            "endpoint": sidecar.subscribed,
            "mode": sidecar.mode,
            "topic": config.topic,
            "replay_endpoint": config.replay_endpoint,
            "redis": redacted(config.redis_url),
            "redis_up": index.available,
            "metrics": metrics_url,
            "started": time.time(),
        }
        logger.info("subscribed to %s", sidecar.subscribed, extra={"fields": fields})
        await stop.wait()
        logger.info("stopping", extra={"fields": {"event": "stopping", "pending": sidecar.backlog}})
        await sidecar.stop(config.drain_timeout_s)
    finally:
        if runner is not None:
            await runner.cleanup()
        await index.close()
    logger.info("stopped", extra={"fields": {"event": "stopped"}})
    return 0
