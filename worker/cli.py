"""``prefix-worker``: run the worker-side programs.

Subcommands: ``sim`` (the vLLM simulator, optionally publishing KV events), ``kv-events``
(the sidecar that applies one worker's KV events to the Redis warm index) and ``vllm`` (runs
real vLLM with prefix caching, prompt token details and KV events). Each subcommand
registers its own parser and handler, so `main` stays a dispatcher; the sidecar's modules
(Redis, the router's index) are imported only when it runs.

``sim`` prints exactly one line, ``listening http://HOST:PORT``, on stdout once it accepts
connections (``--port 0`` picks a free port); logs go to stderr. ``kv-events`` logs JSON lines
on stderr, the first with ``"event": "subscribed"`` once it listens for events. SIGTERM or
SIGINT stops either with exit code 0. ``vllm`` prints the same ``listening`` line once vLLM's
``/health`` answers and passes SIGTERM on to vLLM. This module reads the environment
(``PYTHONHASHSEED`` seeds block hashes, as in vLLM); `worker.vllm` passes it, with the
variables it sets, to the vLLM process.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from worker import vllm as vllm_worker
from worker.announce import announce_until_stopped
from worker.sim.config import (
    DEFAULT_HASH_SEED,
    DEFAULT_KV_EVENTS_BUFFER_STEPS,
    DEFAULT_MODEL,
    KvEventsConfig,
    SimConfig,
)
from worker.sim.server import create_app

logger = logging.getLogger("worker.cli")

SHUTDOWN_TIMEOUT_S = 1.0
"""In-flight requests get this long after SIGTERM before they are cut."""

Handler = Callable[[argparse.Namespace], int]

SIDECAR_CAPACITY_BLOCKS = 1 << 20
"""`SidecarConfig`'s default, repeated so that parsing imports nothing of the sidecar (a unit
test keeps the two equal)."""


def _add_sim_parser(subparsers: Any) -> None:
    sim = subparsers.add_parser(
        "sim",
        help="run the vLLM simulator",
        description="A vLLM-like OpenAI server with a simulated paged prefix cache.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sim.add_argument("--host", default="127.0.0.1", help="address to bind")
    sim.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    sim.add_argument("--worker-id", required=True, help="echoed in the x-worker-id header")
    sim.add_argument("--model", default=DEFAULT_MODEL, help="served model name")
    sim.add_argument("--cache-blocks", type=int, default=2048, help="KV blocks in the cache")
    sim.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    sim.add_argument(
        "--prefill-us-per-token", type=float, default=20.0, help="cost of an uncached prompt token"
    )
    sim.add_argument(
        "--decode-ms-per-token", type=float, default=1.5, help="time between generated tokens"
    )
    sim.add_argument("--max-running", type=int, default=256, help="batch limit; the rest wait FIFO")
    sim.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context limit (None: min(32768, cache capacity))",
    )
    sim.add_argument(
        "--no-prompt-tokens-details",
        action="store_true",
        help="omit usage.prompt_tokens_details (vLLM without --enable-prompt-tokens-details)",
    )
    sim.add_argument(
        "--hash-seed",
        default=None,
        help="root block-hash seed (None: $PYTHONHASHSEED, else vllm-none-hash)",
    )
    sim.add_argument(
        "--stream-interval-ms",
        type=float,
        default=5.0,
        help="shortest pause between two writes of a stream",
    )
    events = sim.add_argument_group("KV events (vLLM's --kv-events-config; off by default)")
    events.add_argument(
        "--kv-events-endpoint",
        default=None,
        metavar="ZMQ",
        help="publish KV events on this ZMQ PUB address: tcp://*:PORT and ipc:// bind, "
        "tcp://HOST:PORT connects (the subscriber binds); tcp://*:0 binds --host on a free port",
    )
    events.add_argument("--kv-events-topic", default="", help="topic frame of every message")
    events.add_argument(
        "--kv-events-replay-endpoint",
        default=None,
        metavar="ZMQ",
        help="ZMQ ROUTER address (bound) that resends buffered batches on request",
    )
    events.add_argument(
        "--kv-events-buffer-steps",
        type=int,
        default=DEFAULT_KV_EVENTS_BUFFER_STEPS,
        help="batches kept for replay",
    )
    sim.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning"], help="stderr log level"
    )
    sim.set_defaults(handler=_run_sim)


def _add_kv_events_parser(subparsers: Any) -> None:
    sidecar = subparsers.add_parser(
        "kv-events",
        help="apply one worker's KV events to the Redis warm index",
        description="Subscribe to one vLLM worker's ZMQ KV events and keep its entries in the "
        "shared Redis warm index exact (docs/kv-events.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sidecar.add_argument("--worker-id", required=True, help="the worker's id in the router")
    sidecar.add_argument(
        "--endpoint",
        required=True,
        metavar="ZMQ",
        help="the publisher's endpoint as given to vLLM; the sidecar does the complement "
        "(connects to tcp://*:PORT or ipc://, binds tcp://HOST:PORT; port 0 binds a free one)",
    )
    sidecar.add_argument("--redis-url", required=True, help="Redis of the warm index")
    sidecar.add_argument("--topic", default="", help="apply only messages with this topic")
    sidecar.add_argument(
        "--replay-endpoint", default=None, metavar="ZMQ", help="the publisher's replay endpoint"
    )
    sidecar.add_argument(
        "--endpoint-mode",
        choices=["auto", "bind", "connect"],
        default="auto",
        help="force bind or connect instead of the complement of the publisher",
    )
    sidecar.add_argument("--prefix", default="pr", help="key prefix of the warm index in Redis")
    sidecar.add_argument(
        "--capacity-blocks",
        type=int,
        default=SIDECAR_CAPACITY_BLOCKS,
        help="blocks remembered for this worker (at least its KV-cache blocks)",
    )
    sidecar.add_argument(
        "--max-pending",
        type=int,
        default=100_000,
        help="index operations held while Redis is down (beyond: drop them, clear the worker)",
    )
    sidecar.add_argument(
        "--replay-timeout-s", type=float, default=2.0, help="deadline of one replay request"
    )
    sidecar.add_argument(
        "--drain-timeout-s",
        type=float,
        default=5.0,
        help="on SIGTERM, how long to wait for queued operations to reach Redis",
    )
    sidecar.add_argument("--metrics-host", default="0.0.0.0", help="address of /metrics")
    sidecar.add_argument(
        "--metrics-port", type=int, default=None, help="serve /metrics and /health (0: free port)"
    )
    sidecar.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning"], help="stderr log level"
    )
    sidecar.set_defaults(handler=_run_kv_events)


def build_parser() -> argparse.ArgumentParser:
    """The ``prefix-worker`` argument parser."""
    parser = argparse.ArgumentParser(prog="prefix-worker", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_sim_parser(subparsers)
    _add_kv_events_parser(subparsers)
    vllm_worker.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and run the chosen subcommand."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


def _run_sim(args: argparse.Namespace) -> int:
    try:
        kv_events = None
        if args.kv_events_endpoint:
            kv_events = KvEventsConfig(
                endpoint=args.kv_events_endpoint,
                topic=args.kv_events_topic,
                replay_endpoint=args.kv_events_replay_endpoint,
                buffer_steps=args.kv_events_buffer_steps,
                bind_host=args.host,
            )
        elif args.kv_events_replay_endpoint:
            raise ValueError("--kv-events-replay-endpoint needs --kv-events-endpoint")
        config = SimConfig(
            worker_id=args.worker_id,
            model=args.model,
            cache_blocks=args.cache_blocks,
            block_size=args.block_size,
            prefill_us_per_token=args.prefill_us_per_token,
            decode_ms_per_token=args.decode_ms_per_token,
            max_running=args.max_running,
            max_model_len=args.max_model_len,
            prompt_tokens_details=not args.no_prompt_tokens_details,
            hash_seed=args.hash_seed or os.environ.get("PYTHONHASHSEED") or DEFAULT_HASH_SEED,
            stream_interval_ms=args.stream_interval_ms,
            kv_events=kv_events,
        )
    except ValueError as exc:
        print(f"prefix-worker sim: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return _run(_serve_sim(config, args.host, args.port))


def _run_kv_events(args: argparse.Namespace) -> int:
    # Imported here: `prefix-worker sim` must not pay for Redis and the router's index.
    from worker.kv_events import SidecarConfig, run_sidecar
    from worker.kv_events.main import configure_logging

    try:
        config = SidecarConfig(
            worker_id=args.worker_id,
            endpoint=args.endpoint,
            redis_url=args.redis_url,
            topic=args.topic,
            replay_endpoint=args.replay_endpoint,
            endpoint_mode=args.endpoint_mode,
            prefix=args.prefix,
            capacity_blocks=args.capacity_blocks,
            max_pending=args.max_pending,
            replay_timeout_s=args.replay_timeout_s,
            drain_timeout_s=args.drain_timeout_s,
            metrics_host=args.metrics_host,
            metrics_port=args.metrics_port,
        )
    except ValueError as exc:
        print(f"prefix-worker kv-events: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level)
    return _run(run_sidecar(config))


async def _serve_sim(config: SimConfig, host: str, port: int) -> int:
    runner = web.AppRunner(
        create_app(config),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        logger.info(
            "worker %s: %d blocks of %d tokens, model %s",
            config.worker_id,
            config.cache_blocks,
            config.block_size,
            config.model,
        )
        await announce_until_stopped(bound_host, bound_port)
        logger.info("stopping")
    finally:
        await runner.cleanup()
    return 0


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run ``coro`` on uvloop when it is installed, else on asyncio's default loop."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)


if __name__ == "__main__":
    sys.exit(main())
