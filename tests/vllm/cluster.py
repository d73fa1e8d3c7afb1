"""Real vLLM CPU workers for tests: started through the launcher, with their KV-event feeds.

`start_cluster` starts N ``prefix-worker vllm`` processes at once (they boot in parallel, each
pinned to its own core) on 127.0.0.1 with free ports, each publishing KV events on its own
``ipc://`` endpoint (vLLM binds it, so any number of subscribers can connect: the tests' own
`KvEventFeed` and the KV-event sidecars of `start_sidecar`). `stop_worker` and `start_again`
(together `restart_worker`) replace one worker by a new vLLM on the same port and endpoint, as
a pod coming back would. Nothing
here is a fixture; tests/vllm/conftest.py wraps it in session fixtures, and other tiers can
import it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgpack
import zmq
from prometheus_client.parser import text_string_to_metric_families

from load_tests.procs import ServerProcess, console_script, spawn, start, wait_ready
from router.exact import ExactConfig
from worker.vllm import kv_events_topic

BLOCK_SIZE = 32
"""vLLM's CPU attention wants a multiple of 32 (it warns otherwise)."""
HASH_SEED = "42"
KV_CACHE_BYTES = 16 << 20
"""16 MiB: 512 blocks of 32 tokens for the tiny model (1 KiB of K and V per token)."""
MODEL_NAME = "tiny-llama"
STARTUP_TIMEOUT_S = 600.0

OFFLINE_ENV = {
    # Nothing may leave this machine: no hub look-ups, no usage statistics, and vLLM's
    # internal sockets on loopback instead of the node's address.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",
}


@dataclass
class VllmWorker:
    """One running vLLM server and how to reach it."""

    worker_id: str
    url: str
    kv_endpoint: str
    """ZMQ endpoint vLLM publishes KV events on (it binds; subscribers connect)."""
    topic: str
    process: ServerProcess
    log_path: Path
    argv: list[str] = field(default_factory=list)
    """The launcher's command line (``--port 0``: the port it picked is in `url`)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment added to the launcher's (offline switches, the core it is pinned to)."""

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def rss_bytes(self) -> int:
        """Resident memory of the launcher and every process under it (API server, engine)."""
        return sum(_rss(pid) for pid in _process_tree(self.process.pid))


@dataclass
class VllmCluster:
    """The running workers and the settings the router's exact mode must share with them."""

    workers: list[VllmWorker]
    model_dir: Path
    model_name: str = MODEL_NAME
    block_size: int = BLOCK_SIZE
    hash_seed: str = HASH_SEED
    startup_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0
    """Workers restarted by `restart_worker` so far (their processes are new)."""

    def exact_config(self) -> ExactConfig:
        return ExactConfig(self.model_dir, block_size=self.block_size, hash_seed=self.hash_seed)

    def router_settings(self, redis_url: str) -> dict[str, Any]:
        """The router settings of precise mode for these workers: vLLM's hashes with their
        tokenizer, block size and seed; the Redis index fed by KV events; shared loads."""
        exact = self.exact_config()
        return {
            "workers": [{"id": w.worker_id, "url": w.url} for w in self.workers],
            "routing": {"hasher": "vllm", "policy": "cache_aware"},
            "exact": {
                "model_dir": str(exact.model_dir),
                "block_size": exact.block_size,
                "hash_algo": exact.hash_algo,
                "hash_seed": exact.hash_seed,
            },
            "index": {"kind": "redis", "kv_events": True},
            "loads": {"kind": "redis"},
            # Generous: vLLM's CPU build keeps both cores busy, and a Redis call that takes
            # longer than the production default (0.25 s) would make the router fall back to
            # the ring and the test's own index lookups fail.
            "redis": {"url": redis_url, "op_timeout_s": 2.0},
        }

    def stop(self) -> list[int | None]:
        return [worker.process.stop(timeout=60) for worker in self.workers]


def worker_argv(
    python: Path, model_dir: Path, worker_id: str, kv_endpoint: str, *extra: str
) -> list[str]:
    """``prefix-worker vllm`` for a tiny CPU worker."""
    return [
        *console_script("prefix-worker"), "vllm",
        "--model", str(model_dir),
        "--served-model-name", MODEL_NAME,
        "--port", "0",
        "--worker-id", worker_id,
        "--block-size", str(BLOCK_SIZE),
        "--hash-seed", HASH_SEED,
        "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
        "--kv-events-endpoint", kv_endpoint,
        "--python", str(python),
        "--startup-timeout", str(STARTUP_TIMEOUT_S),
        "--",
        "--enforce-eager",
        "--max-model-len", "2048",
        "--max-num-seqs", "8",
        # Exposes /v1/*/render, which answers the prompt token ids vLLM computes for a
        # request: the tests compare the router's rendering with it token for token.
        "--enable-scale-out",
        *extra,
    ]  # fmt: skip


WORKER_IDS = ("vllm-a", "vllm-b")


def kv_endpoint(workdir: Path, worker_id: str) -> str:
    """Where ``worker_id`` publishes KV events (known before it starts, so subscribers can
    connect first and miss nothing: ZMQ retries a connect until vLLM binds)."""
    return f"ipc://{workdir}/kv-{worker_id}.sock"


def start_cluster(
    python: Path, model_dir: Path, workdir: Path, worker_ids: Sequence[str] = WORKER_IDS
) -> VllmCluster:
    """Start the workers in parallel; all of them are running on return, or none is."""
    started = time.monotonic()
    cores = os.cpu_count() or 1
    pending = []
    for index, worker_id in enumerate(worker_ids):
        endpoint = kv_endpoint(workdir, worker_id)
        log_path = workdir / f"{worker_id}.log"
        argv = worker_argv(python, model_dir, worker_id, endpoint)
        # One core each: two servers sharing core 0 (vLLM's default binding) run at half speed.
        env = {**OFFLINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": str(index % cores)}
        pending.append(
            (worker_id, endpoint, log_path, argv, spawn(argv, log_path=log_path, env=env))
        )
    workers: list[VllmWorker] = []
    try:
        for worker_id, endpoint, log_path, argv, popen in pending:
            process = wait_ready(
                worker_id, popen, timeout=STARTUP_TIMEOUT_S, log_path=log_path, argv=argv
            )
            workers.append(
                VllmWorker(
                    worker_id, process.url, endpoint, kv_events_topic(worker_id), process,
                    log_path, argv=argv, env=env,
                )
            )  # fmt: skip
    except BaseException:
        for worker in workers:
            worker.process.kill()
        for _, _, _, _, popen in pending:
            if popen.poll() is None:
                popen.kill()
                popen.wait(timeout=30)
        raise
    return VllmCluster(workers, model_dir, startup_seconds=time.monotonic() - started)


def stop_worker(worker: VllmWorker) -> None:
    """Stop ``worker``'s vLLM (SIGTERM, as a rolling restart does); `start_again` brings it back."""
    worker.process.stop(timeout=60)


def start_again(cluster: VllmCluster, worker: VllmWorker) -> None:
    """Start a new vLLM for a stopped ``worker`` on the same port and KV-event endpoint. Its
    prefix cache is empty and its event sequence starts over at 0; subscribers connected to
    the ``ipc://`` endpoint reconnect on their own. ``worker`` is updated in place, so fixtures
    holding it see the new process (and the cluster stops it at the end)."""
    argv = list(worker.argv)
    argv[argv.index("--port") + 1] = str(worker.port)
    cluster.restarts += 1
    name = f"{worker.worker_id}-restart{cluster.restarts}"
    log_path = worker.log_path.with_name(f"{name}.log")
    worker.process = start(name, argv, log_path=log_path, timeout=STARTUP_TIMEOUT_S, env=worker.env)
    worker.log_path = log_path
    worker.url = worker.process.url


def restart_worker(cluster: VllmCluster, worker: VllmWorker) -> float:
    """`stop_worker` then `start_again`; returns the seconds the worker was down."""
    stopped = time.monotonic()
    stop_worker(worker)
    start_again(cluster, worker)
    return time.monotonic() - stopped


@dataclass(frozen=True, slots=True)
class KvBatch:
    topic: str
    seq: int
    ts: float
    events: list[dict[str, Any]]


class KvEventFeed:
    """A ZMQ SUB socket on one worker's KV events, decoding vLLM's three-frame messages.

    ``[topic, seq (8-byte big-endian), msgpack [ts, [event, ...], dp_rank]]``; each event is a
    map whose ``type`` is ``BlockStored``, ``BlockRemoved`` or ``AllBlocksCleared``.
    """

    def __init__(self, context: zmq.Context[Any], endpoint: str, topic: str) -> None:
        self.socket = context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.socket.connect(endpoint)
        self.topic = topic

    def close(self) -> None:
        self.socket.close(linger=0)

    def _receive(self, timeout_s: float) -> KvBatch | None:
        if not self.socket.poll(int(timeout_s * 1000)):
            return None
        topic, seq, payload = self.socket.recv_multipart()
        decoded = msgpack.unpackb(payload)
        return KvBatch(topic.decode(), int.from_bytes(seq, "big"), decoded[0], decoded[1])

    def drain(self) -> list[KvBatch]:
        """Everything already received (call before a request to start from a clean slate)."""
        batches = []
        while (batch := self._receive(0)) is not None:
            batches.append(batch)
        return batches

    def collect_until(
        self, done: Callable[[list[KvBatch]], bool], timeout_s: float = 20.0
    ) -> list[KvBatch]:
        """Receive batches until ``done(batches so far)`` or the deadline; returns them all."""
        batches: list[KvBatch] = []
        deadline = time.monotonic() + timeout_s
        while not done(batches):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            batch = self._receive(min(remaining, 0.5))
            if batch is not None:
                batches.append(batch)
        return batches


def stored_events(batches: Sequence[KvBatch]) -> list[dict[str, Any]]:
    return [e for b in batches for e in b.events if e.get("type") == "BlockStored"]


def stored_hashes(batches: Sequence[KvBatch]) -> list[int]:
    """Every block hash stored, in publication order."""
    return [h for event in stored_events(batches) for h in event["block_hashes"]]


@contextmanager
def kv_feeds(endpoints: Mapping[str, str]) -> Iterator[dict[str, KvEventFeed]]:
    """A subscriber per worker (``worker_id -> endpoint``) for a ``with`` block."""
    context: zmq.Context[Any] = zmq.Context()
    feeds = {
        worker_id: KvEventFeed(context, endpoint, kv_events_topic(worker_id))
        for worker_id, endpoint in endpoints.items()
    }
    try:
        yield feeds
    finally:
        for feed in feeds.values():
            feed.close()
        context.term()


SIDECAR_START_TIMEOUT_S = 30.0


@dataclass
class KvSidecar:
    """A ``prefix-worker kv-events`` process and what its ``subscribed`` log line said."""

    worker_id: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    info: dict[str, Any]

    def metric(self, name: str) -> float:
        """Sum of the samples of ``name`` on the sidecar's ``/metrics``."""
        text = httpx.get(self.info["metrics"], timeout=5).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        )

    def stop(self) -> int:
        """SIGTERM (it drains what is queued), then wait; the exit code."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=15)
        return self.popen.returncode


def start_sidecar(worker: VllmWorker, redis_url: str, log_dir: Path) -> KvSidecar:
    """The KV-event sidecar of ``worker``: connects to its ``ipc://`` endpoint (vLLM binds)
    and applies the events to the warm index at ``redis_url`` under the worker's id. Returns
    once the sidecar logged ``subscribed`` and its publisher connection is up."""
    log_path = log_dir / f"kv-events-{worker.worker_id}.log"
    argv = [
        *console_script("prefix-worker"), "kv-events",
        "--worker-id", worker.worker_id,
        "--endpoint", worker.kv_endpoint,
        "--topic", worker.topic,
        "--redis-url", redis_url,
        "--metrics-host", "127.0.0.1",
        "--metrics-port", "0",
    ]  # fmt: skip
    with log_path.open("wb") as sink:
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=sink
        )
    sidecar = KvSidecar(worker.worker_id, popen, log_path, {})
    try:
        deadline = time.monotonic() + SIDECAR_START_TIMEOUT_S
        while not sidecar.info:
            if popen.poll() is not None:
                raise RuntimeError(
                    f"sidecar exited with {popen.returncode}: {log_path.read_text()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"sidecar not subscribed in time: {log_path.read_text()}")
            for line in log_path.read_text().splitlines():
                entry = json.loads(line)
                if entry.get("event") == "subscribed":
                    sidecar.info = entry
            time.sleep(0.05)
        # "subscribed" is logged once the socket connects; the ipc connection to vLLM follows.
        while sidecar.metric("prefix_router_kv_events_publishers") < 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"sidecar never reached {worker.kv_endpoint}")
            time.sleep(0.05)
    except BaseException:
        sidecar.stop()
        raise
    return sidecar


def _process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                parent = int(handle.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
