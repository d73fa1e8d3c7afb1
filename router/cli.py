"""``prefix-router``: the router's command line.

    prefix-router serve [--config FILE ...] [--worker URL ...] [--host H] [--port P] [--policy NAME]
                        [--processes N]

Flags override the file and the environment (see `router.config`). Once the server accepts
connections it prints one line, ``listening http://HOST:PORT``, on stdout; logs go to stderr.
``--processes N`` runs N router processes on the same port (`router.supervisor`).
SIGTERM or SIGINT: report not-ready, refuse new requests, let in-flight ones finish within
``server.shutdown_grace_s``, then exit 0 (`router.lifecycle`; a second signal stops waiting).
SIGHUP: read the file and the environment again, with the same flags, and apply what can
change live (`router.reload`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from router import insights_cli
from router.app import create_admin_app, create_app
from router.config import ConfigError, Settings, load_settings
from router.core.policies import POLICY_NAMES
from router.http_server import RouterAppRunner
from router.lifecycle import CLOSE_TIMEOUT_S, drain_and_stop
from router.reload import SettingsLoader
from router.state import STATE
from router.supervisor import supervise
from router.telemetry import configure_logging

log = logging.getLogger("prefix_router.cli")


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefix-router", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_serve(commands)
    insights_cli.add_parser(commands)
    return parser


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser("serve", help="run the router")
    serve.add_argument(
        "--config",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="YAML settings file; repeat to merge several, later ones overriding earlier ones "
        "(say, a ConfigMap's settings and a Secret's keys, both reread on SIGHUP)",
    )
    serve.add_argument(
        "--worker", action="append", default=[], metavar="URL", help="worker base URL (repeat)"
    )
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind; 0 picks a free one")
    serve.add_argument("--policy", choices=sorted(POLICY_NAMES), help="routing policy")
    serve.add_argument("--admin-token", help="enable the admin API with this bearer token")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--check", action="store_true", help="validate the settings, print them, and exit"
    )
    serve.add_argument(
        "--processes",
        type=_positive_int,
        default=1,
        metavar="N",
        help="run N router processes sharing the port (SO_REUSEPORT), one per core; each has "
        "its own warm index and loads unless index.kind/loads.kind are redis",
    )
    # Set by the --processes supervisor on the processes it starts: bind with SO_REUSEPORT.
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    server: dict[str, Any] = {}
    if args.host is not None:
        server["host"] = args.host
    if args.port is not None:
        server["port"] = args.port
    if args.admin_token is not None:
        server["admin_token"] = args.admin_token
    if server:
        overrides["server"] = server
    if args.worker:
        overrides["workers"] = [{"url": url} for url in args.worker]
    if args.policy is not None:
        overrides["routing"] = {"policy": args.policy}
    if args.log_level is not None:
        overrides["telemetry"] = {"log_level": args.log_level}
    return overrides


async def serve(
    settings: Settings, loader: SettingsLoader | None = None, *, reuse_port: bool = False
) -> None:
    app = create_app(settings, settings_loader=loader)
    state = app[STATE]
    runner = _runner(app, settings, CLOSE_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(
        runner, settings.server.host, settings.server.port, reuse_address=True,
        reuse_port=reuse_port or None,
    )  # fmt: skip
    await site.start()
    host, port = runner.addresses[0][:2]
    admin_runner = await _serve_admin(app, settings, reuse_port=reuse_port)
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_stop_signal() -> None:
        # The first signal starts the drain; another one cuts it short.
        (hurry if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal)
    loop.add_signal_handler(signal.SIGHUP, state.reloader.request, "sighup")
    discovery = settings.discovery
    log.info(
        "router started",
        extra={"fields": {"url": f"http://{host}:{port}", "policy": settings.routing.policy,
                          "workers": [w.id for w in state.pool.members()],
                          "discovery": discovery.name if discovery.kind == "dns" else "static",
                          "tracing": state.tracing.description}},
    )  # fmt: skip
    # Everything built so far (modules, settings, the app) lives as long as the process: take
    # it out of the collector's sight, and collect young objects less often. Requests make few
    # reference cycles, and the default thresholds ran a collection every few requests.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    print(f"listening http://{host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        try:
            if admin_runner is not None:
                await admin_runner.cleanup()
            await drain_and_stop(runner, state, hurry)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
    log.info("stopped")


def _runner(app: web.Application, settings: Settings, shutdown_timeout: float) -> web.AppRunner:
    """A runner whose request parser enforces the ``server.max_*`` header limits, and whose
    refusals (like every other error) are OpenAI-style JSON (`router.http_server`)."""
    server = settings.server
    return RouterAppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
        max_line_size=server.max_line_bytes,
        max_field_size=server.max_header_bytes,
        max_headers=server.max_headers,
    )


async def _serve_admin(
    app: web.Application, settings: Settings, *, reuse_port: bool = False
) -> web.AppRunner | None:
    """The admin listener on ``server.admin_host:admin_port``, when one is configured."""
    server = settings.server
    if server.admin_public and server.admin_token is not None:
        log.warning(
            "the admin API is served on the public port (server.admin_on_public_port); set "
            "server.admin_port instead to give it its own (loopback) listener"
        )
    if server.admin_port is None:
        if server.admin_token is not None and not server.admin_public:
            log.warning(
                "server.admin_token is set but the admin API has no listener: set "
                "server.admin_port (or server.admin_on_public_port: true)"
            )
        return None
    runner = _runner(create_admin_app(app), settings, 1.0)
    await runner.setup()
    # Under --processes every process serves the admin API too (any one of them answers).
    await web.TCPSite(
        runner, server.admin_host, server.admin_port, reuse_address=True,
        reuse_port=reuse_port or None,
    ).start()  # fmt: skip
    host, port = runner.addresses[0][:2]
    enabled = server.admin_token is not None
    log.info("admin API listening",
             extra={"fields": {"url": f"http://{host}:{port}", "enabled": enabled}})  # fmt: skip
    return runner


def _loader(args: argparse.Namespace) -> SettingsLoader:
    """Reads the settings again as at start: the same file, the environment, the same flags."""
    overrides = _overrides(args)
    return lambda: load_settings(args.config, overrides=overrides)


def _run(settings: Settings, loader: SettingsLoader, *, reuse_port: bool) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(settings, loader, reuse_port=reuse_port))
        return
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(settings, loader, reuse_port=reuse_port))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.command == "insights":
        return insights_cli.run(args)
    return _serve_command(args, argv)


def _serve_command(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        settings = load_settings(args.config, overrides=_overrides(args))
    except ConfigError as exc:
        print(f"prefix-router: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(settings.model_dump_json(indent=2))
        return 0
    if not settings.workers and settings.discovery.kind == "static":
        print(
            "prefix-router: no workers configured (use --worker URL, workers: in the config "
            "file, PREFIX_ROUTER_WORKERS, or discovery: {kind: dns, name: ...})",
            file=sys.stderr,
        )
        return 2
    configure_logging(settings.telemetry)
    if args.processes > 1:
        if settings.index.kind != "redis" or settings.loads.kind != "redis":
            log.warning(
                "--processes %d with an in-process warm index or load board: each process "
                "learns and counts only its own requests; set index.kind and loads.kind to "
                "redis to share them",
                args.processes,
            )
        return supervise(argv, settings.server.host, settings.server.port, args.processes)
    _run(settings, _loader(args), reuse_port=args.reuse_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
