"""The sidecar: one worker's KV events in, operations on the shared warm index out.

`KvEventsSidecar` owns a SUB socket (bound or connected as the complement of the publisher),
a receive task that checks sequence numbers (`resync`), fetches missed batches from the
replay endpoint and queues index operations, an apply task that runs them against the index
in order, and a monitor task that clears the worker's entries when the publisher's connection
drops (the worker most likely died; it may come back as a new process). Redis outages:
operations wait in a bounded FIFO and are retried once the index is back; an overflow turns
into one clear, counted. `stop` applies what is queued within a deadline. Counters live in
`SidecarMetrics`, a registry of the sidecar's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client import generate_latest as render_metrics
from zmq.utils.monitor import parse_monitor_message

from router.errors import IndexUnavailable
from router.tasks import cancel_and_wait
from worker.kv_events.resync import IndexOp, PendingOps, SequenceTracker, Verdict, batch_ops
from worker.kv_events.wire import (
    Batch,
    DecodeError,
    EndpointMode,
    decode_batch,
    prepare_socket,
    reachable,
    subscriber_plan,
)

logger = logging.getLogger("worker.kv_events")

SUB_HWM = 100_000
"""Messages the SUB socket queues while a replay or a Redis wait holds the receiver (vLLM's
publisher queues as many)."""
DEFAULT_CAPACITY_BLOCKS = 1 << 20
REDIS_RETRY_S = 0.1


class IndexSink(Protocol):
    """What the sidecar needs of the warm index (`RedisWarmIndex` has it)."""

    @property
    def available(self) -> bool: ...

    async def record(self, worker: Any, chain: Sequence[int], source: Any) -> None: ...

    async def remove(self, worker: Any, hashes: Sequence[int]) -> None: ...

    async def clear(self, worker: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    """The sidecar's settings (the ``prefix-worker kv-events`` flags)."""

    worker_id: str
    """The worker's id as the router knows it: entries are recorded under it."""
    endpoint: str
    """The publisher's address as configured in vLLM (``--kv-events-config`` endpoint)."""
    redis_url: str
    topic: str = ""
    """Only messages with exactly this topic are applied (ZMQ filters by prefix)."""
    replay_endpoint: str | None = None
    """The publisher's replay address; without it, gaps are repaired by clearing."""
    endpoint_mode: EndpointMode = "auto"
    """``auto``: bind or connect as the complement of the publisher; or force one."""
    prefix: str = "pr"
    """Key prefix of the warm index in Redis: the same as the routers use."""
    capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS
    """Blocks remembered for the worker (LRU beyond); at least the worker's KV blocks."""
    max_pending: int = 100_000
    """Index operations held while Redis is down; beyond, they are dropped for one clear."""
    replay_timeout_s: float = 2.0
    drain_timeout_s: float = 5.0
    """How long SIGTERM waits for queued operations to reach Redis."""
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = None
    """Serve ``/metrics`` and ``/health`` here (0: a free port, logged); None: no server."""

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")
        if "://" not in self.endpoint:
            raise ValueError(f"endpoint must be a ZMQ address like tcp://*:5557: {self.endpoint!r}")
        if self.replay_endpoint is not None and "://" not in self.replay_endpoint:
            raise ValueError(f"replay endpoint must be a ZMQ address: {self.replay_endpoint!r}")
        if self.capacity_blocks < 1 or self.max_pending < 1:
            raise ValueError("capacity_blocks and max_pending must be >= 1")
        if self.replay_timeout_s <= 0 or self.drain_timeout_s < 0:
            raise ValueError("replay_timeout_s must be > 0 and drain_timeout_s >= 0")


class SidecarMetrics:
    """The sidecar's counters, in a registry of its own."""

    def __init__(self, worker: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, w = self.registry, ["worker"]

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(f"prefix_router_kv_events_{name}", doc, [*w, *labels], registry=r)

        self.batches = counter("batches_total", "Batches accepted, live or replayed.", ["source"])
        self.events = counter("applied_total", "KV events applied to the index.", ["type"])
        self.ignored = counter("ignored_total", "Events or messages skipped.", ["reason"])
        self.gaps = counter("gaps_total", "Sequence gaps (missed batches).")
        self.resyncs = counter("resyncs_total", "Gaps repaired, by replay or clear.", ["method"])
        self.restarts = counter("restarts_total", "Publisher restarts (sequence went back).")
        self.redis_errors = counter("redis_errors_total", "Redis outages seen (each once).")
        self.dropped = counter("dropped_total", "Events dropped while Redis was down.")
        self.decode_errors = counter("decode_errors_total", "Messages that did not decode.")
        self.last_seq = Gauge(
            "prefix_router_kv_events_last_seq", "Last batch applied.", w, registry=r
        )
        self.pending = Gauge(
            "prefix_router_kv_events_pending", "Operations waiting for Redis.", w, registry=r
        )
        self.connected = Gauge(
            "prefix_router_kv_events_publishers", "Publisher connections.", w, registry=r
        )
        self.redis_up = Gauge(
            "prefix_router_kv_events_redis_up", "1 while the index is reachable.", w, registry=r
        )
        self.worker = worker

    def render(self) -> bytes:
        return render_metrics(self.registry)


@dataclass(eq=False)
class KvEventsSidecar:
    """Subscribes to one worker's events and applies them to ``index`` (module docstring)."""

    config: SidecarConfig
    index: IndexSink
    metrics: SidecarMetrics
    tracker: SequenceTracker = field(default_factory=SequenceTracker)
    subscribed: str = ""
    """The address bound or connected to (a bound ``tcp://HOST:0`` shows its port)."""
    mode: str = ""

    def __post_init__(self) -> None:
        self._pending = PendingOps(self.config.max_pending)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._topic = self.config.topic.encode("utf-8")
        self._ctx: zmq.asyncio.Context | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._in_flight: IndexOp | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._applier: asyncio.Task[None] | None = None
        self._peers = 0
        m, w = self.metrics, self.config.worker_id
        m.pending.labels(w).set_function(lambda: float(len(self._pending)))
        m.redis_up.labels(w).set_function(lambda: float(self.index.available))
        m.connected.labels(w).set_function(lambda: float(self._peers))

    async def start(self) -> None:
        """Open the SUB socket (bind or connect) and start receiving and applying."""
        self._ctx = ctx = zmq.asyncio.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, SUB_HWM)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        watched = zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
        self._monitor = monitor = sub.get_monitor_socket(watched)
        self.mode, address = subscriber_plan(self.config.endpoint, self.config.endpoint_mode)
        prepare_socket(sub, address)
        if self.mode == "bind":
            sub.bind(address)
            bound = sub.getsockopt_string(zmq.LAST_ENDPOINT)
            self.subscribed = str(bound) if address.startswith("tcp://") else address
        else:
            sub.connect(address)
            self.subscribed = address
        self._sub = sub
        self._applier = asyncio.create_task(self._apply_loop(), name="kv-apply")
        self._tasks = [
            asyncio.create_task(self._receive_loop(sub), name="kv-receive"),
            asyncio.create_task(self._watch(monitor), name="kv-monitor"),
        ]

    async def stop(self, drain_timeout_s: float) -> bool:
        """Stop receiving, apply what is queued within the deadline, close. True if drained."""
        if self._ctx is None:
            return self.backlog == 0
        await cancel_and_wait(*self._tasks)
        drained = True
        try:
            async with asyncio.timeout(drain_timeout_s):
                await self._idle.wait()
        except TimeoutError:
            drained = False
            logger.warning("shutdown: %d index operations not applied", self.backlog)
        await cancel_and_wait(self._applier)
        self._tasks, self._applier = [], None
        if self._sub is not None:
            self._sub.disable_monitor()
            self._sub.close(linger=0)
            self._sub = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None
        return drained

    async def handle(self, frames: Sequence[bytes]) -> None:
        """One live message ``[topic, seq, payload]``."""
        m, w = self.metrics, self.config.worker_id
        if len(frames) != 3 or len(frames[1]) != 8:
            m.decode_errors.labels(w).inc()
            logger.warning("ignored a message of %d frames", len(frames))
            return
        topic, seq_bytes, payload = frames
        if topic != self._topic:
            m.ignored.labels(w, "topic").inc()
            return
        seq = int.from_bytes(seq_bytes, "big")
        try:
            batch = decode_batch(payload)
        except DecodeError as exc:
            # Not applied, so the next batch looks like a gap and goes through resync.
            m.decode_errors.labels(w).inc()
            logger.warning("batch %d did not decode: %s", seq, exc)
            return
        verdict = self.tracker.check(seq)
        if verdict.kind == "restart":
            m.restarts.labels(w).inc()
            logger.warning("publisher restarted (batch %d after %s)", seq, self.tracker.last)
        if verdict.clear_first:
            self._enqueue(IndexOp("clear", events=0))
        if verdict.missing:
            m.gaps.labels(w).inc()
            await self._resync(verdict)
        self._accept(batch, "live")
        self.tracker.advance(seq)
        m.last_seq.labels(w).set(seq)

    async def _resync(self, verdict: Verdict) -> None:
        missing, m, w = verdict.missing, self.metrics, self.config.worker_id
        got = await self._replay(missing) if self.config.replay_endpoint else {}
        if len(got) == len(missing):
            for seq in missing:
                self._accept(got[seq], "replay")
            m.resyncs.labels(w, "replay").inc()
            logger.info("replayed batches %d..%d", missing.start, missing.stop - 1)
            return
        if not verdict.clear_first:
            self._enqueue(IndexOp("clear", events=0))
        m.resyncs.labels(w, "clear").inc()
        # After a clear, any contiguous run of batches that ends just before this one is safe
        # to apply: every removal that follows a store in it is applied too.
        tail: list[Batch] = []
        for seq in reversed(missing):
            if seq not in got:
                break
            tail.append(got[seq])
        for batch in reversed(tail):
            self._accept(batch, "replay")
        logger.warning(
            "missed batches %d..%d (%d replayed): cleared worker %s",
            missing.start,
            missing.stop - 1,
            len(tail),
            w,
        )

    async def _replay(self, missing: range) -> dict[int, Batch]:
        """Ask the replay endpoint for ``missing``; whatever arrived before the deadline."""
        assert self._ctx is not None
        assert self.config.replay_endpoint is not None
        address = reachable(self.config.replay_endpoint)
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        prepare_socket(dealer, address)
        dealer.connect(address)
        got: dict[int, Batch] = {}
        try:
            async with asyncio.timeout(self.config.replay_timeout_s):
                await dealer.send_multipart([b"", missing.start.to_bytes(8, "big")])
                while True:
                    frames = await dealer.recv_multipart()
                    if frames and frames[0] == b"":
                        frames = frames[1:]
                    # vLLM 0.32 sends [topic, seq, payload]; earlier releases [seq, payload].
                    seq_bytes, payload = frames[-2:] if len(frames) >= 2 else (b"", b"")
                    seq = int.from_bytes(seq_bytes, "big", signed=True)
                    if seq < 0 or not payload:
                        break
                    if seq in missing:
                        with contextlib.suppress(DecodeError):
                            got[seq] = decode_batch(payload)
                    if seq >= missing.stop - 1:
                        break
        except TimeoutError:
            logger.warning("replay from %s timed out", address)
        finally:
            dealer.close(linger=0)
        return got

    @property
    def backlog(self) -> int:
        """Index operations not yet applied (queued, or in flight)."""
        return len(self._pending) + (self._in_flight is not None)

    def _accept(self, batch: Batch, source: str) -> None:
        m, w = self.metrics, self.config.worker_id
        ops, skipped = batch_ops(batch.events)
        if skipped:
            m.ignored.labels(w, "medium").inc(skipped)
        if batch.unknown:
            m.ignored.labels(w, "unknown_type").inc(batch.unknown)
        for op in ops:
            self._enqueue(op)
        m.batches.labels(w, source).inc()

    def _enqueue(self, op: IndexOp) -> None:
        dropped = self._pending.push(op)
        if dropped:
            self.metrics.dropped.labels(self.config.worker_id).inc(dropped)
            logger.warning("Redis backlog full: dropped %d events, will clear", dropped)
        self._idle.clear()
        self._wake.set()

    async def _receive_loop(self, sub: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sub.recv_multipart()
            try:
                await self.handle(frames)
            except Exception:  # never let one bad message stop the sidecar
                logger.exception("failed to handle a KV-event message")

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())["event"]
            if event in (zmq.EVENT_CONNECTED, zmq.EVENT_ACCEPTED):
                self._peers += 1
                logger.info("publisher connected")
            elif event == zmq.EVENT_DISCONNECTED:
                self._peers = max(0, self._peers - 1)
                self.tracker.peer_lost()
                # Most likely the worker died and its cache with it. Waiting for the new
                # process's first batch (sequence back to 0) would leave its old entries
                # routable until a request reaches it, and vLLM publishes nothing at start.
                # If it was only the connection, clearing loses hints, never correctness.
                # Batches still queued from before the drop may land after this clear; the
                # new process's first batch is then taken for a restart and clears again.
                self._enqueue(IndexOp("clear", events=0))
                logger.info("publisher disconnected: cleared worker %s", self.config.worker_id)

    async def _apply_loop(self) -> None:
        m, w = self.metrics, self.config.worker_id
        failing = False
        while True:
            taken = self._pending.take()
            if taken is None:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            op, token = taken
            self._in_flight = op
            try:
                await self._execute(op)
            except IndexUnavailable as exc:
                # While down, the index refuses at once without touching the network and probes
                # Redis on its own, so retrying on a short timer is cheap. Each outage counts
                # once, not every refusal during it.
                if not failing:
                    failing = True
                    m.redis_errors.labels(w).inc()
                    logger.warning("index unavailable, holding operations: %s", exc)
                self._pending.retry(op, token)
                self._in_flight = None
                await asyncio.sleep(REDIS_RETRY_S)
                continue
            except Exception:  # a bug must not stop the sidecar: skip the op, keep going
                logger.exception("index operation %s failed; skipped", op.kind)
                m.ignored.labels(w, "failed_op").inc()
                self._in_flight = None
                continue
            self._in_flight = None
            if failing:
                failing = False
                logger.info("index reachable again; %d operations waiting", len(self._pending))
            if op.events:
                m.events.labels(w, _EVENT_TYPE[op.kind]).inc(op.events)

    async def _execute(self, op: IndexOp) -> None:
        worker = self.config.worker_id
        if op.kind == "record":
            await self.index.record(worker, op.hashes, "confirmed")
        elif op.kind == "remove":
            await self.index.remove(worker, op.hashes)
        else:
            await self.index.clear(worker)


_EVENT_TYPE = {"record": "BlockStored", "remove": "BlockRemoved", "clear": "AllBlocksCleared"}
