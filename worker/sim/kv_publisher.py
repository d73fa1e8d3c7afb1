"""KV events in vLLM's exact wire format, published on ZMQ the way vLLM's publisher does.

Wire format (as of vLLM 0.32, ``vllm/distributed/kv_events.py``). Each message has three frames::

    [topic (UTF-8), sequence (8-byte big-endian, unsigned), payload (msgpack)]

The payload is the msgpack *array* ``[ts, events, data_parallel_rank]`` (the batch struct is
``array_like``): ``ts`` is a float64 of ``time.time()``, ``data_parallel_rank`` is 0. Each event
is a msgpack *map* whose first key is ``type`` (msgspec's tag) followed by the fields in
declaration order; a field that has a default is left out while it holds that default:

    BlockStored       block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
                      lora_name, extra_keys (one entry per block), group_idx
    BlockRemoved      block_hashes (vLLM sends one hash per event), medium, group_idx
    AllBlocksCleared  no fields

Block hashes are the low 64 bits of the sha256 digests as unsigned ints (vLLM's default,
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``). ``medium`` is ``"GPU"``, ``lora_id`` and
``lora_name`` null, ``group_idx`` 0 (a single KV-cache group), and ``extra_keys`` has
``[cache_salt]`` for block 0 of a salted request and null for every other block (vLLM publishes
the keys without the tags it hashes them with).

Batching: vLLM publishes one batch per engine step with that step's events. The simulator has
no steps; it collects the events raised during one turn of the event loop (one admission, one
decode tick) and publishes them as one batch from a ``call_soon``. Batches are numbered from 0
at every start of the process, as vLLM numbers them.

Endpoints follow vLLM: the PUB socket binds an address with a wildcard (``*``, ``::``) or an
``ipc://``/``inproc://`` one and connects to any other (then the subscriber binds); the replay
ROUTER always binds. ``tcp://*:0`` binds ``config.bind_host`` on a free port (vLLM binds the node's
IP) and the bound address is reported. Replay: a client sends ``["", start_seq]`` (8 bytes,
big-endian) from a DEALER; the ROUTER answers each buffered batch with ``seq >= start_seq`` as
``["", topic, seq, payload]`` and ends with ``["", "", -1 (8 bytes, signed), ""]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from worker.sim.cache import AllBlocksCleared, BlockRemoved, BlockStored, CacheEvent
from worker.sim.config import KvEventsConfig
from worker.sim.hashing import low64

logger = logging.getLogger("worker.sim.kv_events")

MEDIUM_GPU = "GPU"
END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""Sequence frame of the message that ends a replay."""
PUB_HWM = 100_000
"""vLLM's ``KVEventsConfig.hwm`` default: messages queued per subscriber before dropping."""
CLOSE_LINGER_MS = 200
"""How long closing sockets may still push queued messages out."""


class WireBlockStored(
    msgspec.Struct, tag_field="type", tag="BlockStored", omit_defaults=True, gc=False
):
    """vLLM's ``BlockStored`` event, field for field (fields without defaults always go out)."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[str, ...] | None] | None = None
    group_idx: int | None = None


class WireBlockRemoved(
    msgspec.Struct, tag_field="type", tag="BlockRemoved", omit_defaults=True, gc=False
):
    """vLLM's ``BlockRemoved`` event."""

    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None


class WireAllBlocksCleared(
    msgspec.Struct, tag_field="type", tag="AllBlocksCleared", omit_defaults=True, gc=False
):
    """vLLM's ``AllBlocksCleared`` event."""


WireEvent = WireBlockStored | WireBlockRemoved | WireAllBlocksCleared


class WireBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """vLLM's ``KVEventBatch``: encoded as the array ``[ts, events, data_parallel_rank]``."""

    ts: float
    events: list[WireEvent]
    data_parallel_rank: int | None = None


def wire_event(event: CacheEvent) -> WireEvent:
    """The cache's event as vLLM would publish it."""
    if isinstance(event, BlockStored):
        salted_first = event.parent_block_hash is None and bool(event.cache_salt)
        extra_keys: list[tuple[str, ...] | None] = [None] * len(event.block_hashes)
        if salted_first and extra_keys:
            extra_keys[0] = (str(event.cache_salt),)
        return WireBlockStored(
            block_hashes=[low64(h) for h in event.block_hashes],
            parent_block_hash=(
                None if event.parent_block_hash is None else low64(event.parent_block_hash)
            ),
            token_ids=list(event.token_ids),
            block_size=event.block_size,
            lora_id=None,
            medium=MEDIUM_GPU,
            lora_name=None,
            extra_keys=extra_keys or None,
            group_idx=0,
        )
    if isinstance(event, BlockRemoved):
        return WireBlockRemoved(
            block_hashes=[low64(h) for h in event.block_hashes], medium=MEDIUM_GPU, group_idx=0
        )
    assert isinstance(event, AllBlocksCleared)
    return WireAllBlocksCleared()


def encode_batch(ts: float, events: list[WireEvent], data_parallel_rank: int = 0) -> bytes:
    """The msgpack payload of one batch."""
    return msgspec.msgpack.encode(WireBatch(ts, events, data_parallel_rank))


def encode_seq(seq: int) -> bytes:
    """The sequence frame: 8 bytes, big-endian."""
    return seq.to_bytes(8, "big")


def publisher_binds(endpoint: str) -> bool:
    """vLLM's rule: bind wildcard, IPv6-any and ipc/inproc addresses, connect to the rest."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def _prepare(sock: zmq.Socket[Any], endpoint: str) -> None:
    if endpoint.startswith("tcp://[") or "::" in endpoint:
        sock.setsockopt(zmq.IPV6, 1)


def _bind(sock: zmq.Socket[Any], endpoint: str, bind_host: str) -> str:
    """Bind ``endpoint`` (``tcp://*:0``: ``bind_host`` on a free port); the bound address."""
    if endpoint == "tcp://*:0":
        endpoint = f"tcp://{bind_host}:0"
    _prepare(sock, endpoint)
    sock.bind(endpoint)
    if endpoint.startswith("tcp://"):
        return str(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    return endpoint


class KvEventPublisher:
    """Publishes a `PrefixCache`'s events as vLLM does (see the module docstring).

    `start` opens the sockets (inside a running loop), `listener` is the cache callback,
    `close` publishes what is pending and closes the sockets.
    """

    def __init__(
        self,
        config: KvEventsConfig,
        *,
        data_parallel_rank: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._bind_host = config.bind_host
        self._rank = data_parallel_rank
        self._clock = clock
        self._topic = config.topic.encode("utf-8")
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._pending: list[WireEvent] = []
        self._flush_scheduled = False
        self._next_seq = 0
        self.events_published = 0
        self.endpoint = config.endpoint
        """The PUB address in use (the bound one when the publisher binds)."""
        self.replay_endpoint = config.replay_endpoint
        self._ctx: zmq.asyncio.Context | None = None
        self._pub: zmq.Socket[Any] | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def next_seq(self) -> int:
        """The sequence number the next batch will carry (= batches published so far)."""
        return self._next_seq

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ctx = ctx = zmq.asyncio.Context()
        # A plain socket on the asyncio context: PUB never blocks, so sends need no awaiting.
        pub: zmq.Socket[Any] = zmq.Socket(ctx, zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, PUB_HWM)
        pub.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
        self._pub = pub
        if publisher_binds(self.config.endpoint):
            self.endpoint = _bind(pub, self.config.endpoint, self._bind_host)
        else:
            _prepare(pub, self.config.endpoint)
            pub.connect(self.config.endpoint)
        if self.config.replay_endpoint is not None:
            replay = ctx.socket(zmq.ROUTER)
            # vLLM's ROUTER drops replies beyond its default HWM of 1000; ours waits for the
            # client to read instead, so a long replay arrives whole (same frames on the wire).
            replay.setsockopt(zmq.ROUTER_MANDATORY, 1)
            replay.setsockopt(zmq.SNDHWM, self.config.buffer_steps + 2)
            replay.setsockopt(zmq.LINGER, 0)
            self.replay_endpoint = _bind(replay, self.config.replay_endpoint, self._bind_host)
            self._replay = replay
            self._replay_task = asyncio.create_task(self._serve_replay(), name="kv-replay")
        logger.info(
            "KV events: publishing on %s (%s), topic %r, replay %s",
            self.endpoint,
            "bound" if publisher_binds(self.config.endpoint) else "connected",
            self.config.topic,
            self.replay_endpoint,
        )

    def listener(self, event: CacheEvent) -> None:
        """`PrefixCache` callback: queue the event; publish the loop turn's events together."""
        self._pending.append(wire_event(event))
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Publish the queued events as one batch (nothing when none are queued)."""
        self._flush_scheduled = False
        if not self._pending or self._pub is None:
            return
        events, self._pending = self._pending, []
        seq = self._next_seq
        self._next_seq += 1
        payload = encode_batch(self._clock(), events, self._rank)
        try:
            self._pub.send_multipart((self._topic, encode_seq(seq), payload), flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # vLLM logs and goes on; the batch stays replayable and subscribers see a gap.
            logger.warning("KV events: batch %d not sent: %s", seq, exc)
        self._buffer.append((seq, payload))
        self.events_published += len(events)

    async def close(self) -> None:
        self.flush()
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
            self._replay_task = None
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close()
        self._pub = self._replay = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def state(self) -> dict[str, Any]:
        """What ``/sim/state`` shows under ``kv_events``."""
        return {
            "endpoint": self.endpoint,
            "topic": self.config.topic,
            "replay_endpoint": self.replay_endpoint,
            "next_seq": self._next_seq,
            "events_published": self.events_published,
            "buffered_batches": len(self._buffer),
        }

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        replay = self._replay
        while True:
            frames = await replay.recv_multipart()
            if len(frames) != 3:
                logger.warning("KV events: ignored a replay request of %d frames", len(frames))
                continue
            identity, _, start = frames
            start_seq = int.from_bytes(start, "big")
            try:
                for seq, payload in list(self._buffer):
                    if seq >= start_seq:
                        await replay.send_multipart(
                            [identity, b"", self._topic, encode_seq(seq), payload]
                        )
                await replay.send_multipart([identity, b"", b"", END_SEQ, b""])
            except zmq.ZMQError as exc:  # the client went away mid-replay
                logger.warning("KV events: replay from %d aborted: %s", start_seq, exc)
