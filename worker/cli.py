"""``prefix-worker``: run the worker-side programs.

Subcommands: ``sim`` (the vLLM simulator). ``vllm`` (launch real vLLM) and ``kv-events``
(the KV-event sidecar) will join it; each subcommand registers its own parser and handler
with `_add_<name>_parser`, so `main` stays a dispatcher.

``sim`` prints exactly one line, ``listening http://HOST:PORT``, on stdout once it accepts
connections (``--port 0`` picks a free port); logs go to stderr. SIGTERM or SIGINT stops it
with exit code 0. This is the only module of ``worker`` that reads the environment
(``PYTHONHASHSEED`` seeds block hashes, as in vLLM).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from worker.sim.config import DEFAULT_HASH_SEED, DEFAULT_MODEL, SimConfig
from worker.sim.server import create_app

logger = logging.getLogger("worker.cli")

SHUTDOWN_TIMEOUT_S = 1.0
"""In-flight requests get this long after SIGTERM before they are cut."""

Handler = Callable[[argparse.Namespace], int]


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
    sim.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning"], help="stderr log level"
    )
    sim.set_defaults(handler=_run_sim)


def build_parser() -> argparse.ArgumentParser:
    """The ``prefix-worker`` argument parser."""
    parser = argparse.ArgumentParser(prog="prefix-worker", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_sim_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and run the chosen subcommand."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


def _run_sim(args: argparse.Namespace) -> int:
    try:
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
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        logger.info(
            "worker %s: %d blocks of %d tokens, model %s",
            config.worker_id,
            config.cache_blocks,
            config.block_size,
            config.model,
        )
        print(f"listening http://{shown}:{bound_port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
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
