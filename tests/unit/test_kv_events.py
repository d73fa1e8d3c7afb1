"""KV events: the simulator's encoding is vLLM's byte for byte, the sidecar reads it (and older
layouts), and its decisions on sequence numbers and Redis outages are the documented ones."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio

from router.errors import IndexUnavailable
from worker.cli import SIDECAR_CAPACITY_BLOCKS, build_parser
from worker.kv_events import (
    Cleared,
    DecodeError,
    IndexOp,
    KvEventsSidecar,
    PendingOps,
    Removed,
    SequenceTracker,
    SidecarConfig,
    SidecarMetrics,
    Stored,
    batch_ops,
    decode_batch,
    subscriber_plan,
)
from worker.kv_events import wire as sidecar_wire
from worker.sim import SIM_STATE, SimConfig, create_app
from worker.sim.cache import AllBlocksCleared, BlockRemoved, BlockStored, CacheEvent, PrefixCache
from worker.sim.config import KvEventsConfig
from worker.sim.hashing import BlockHasher, low64
from worker.sim.kv_publisher import (
    END_SEQ,
    KvEventPublisher,
    WireAllBlocksCleared,
    WireBlockRemoved,
    WireBlockStored,
    encode_batch,
    wire_event,
)
from worker.sim.kv_publisher import publisher_binds as sim_publisher_binds

# ---- the wire format ---------------------------------------------------------------------------


def _s(text: str) -> bytes:
    """A msgpack fixstr (every string below is under 32 bytes)."""
    return bytes([0xA0 | len(text)]) + text.encode()


# Derived by hand from vLLM 0.32's definitions (vllm/distributed/kv_events.py): the batch is an
# array_like struct; events are tagged structs (tag field "type", first) encoded as maps with
# omit_defaults, so lora_id/medium/lora_name (no default) always appear and the optional
# fields only when set. Checked once against vLLM 0.32's own msgspec encoder: identical.
GOLDEN = b"".join(
    [
        b"\x93",  # array(3): [ts, events, data_parallel_rank]
        b"\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00",  # float64 1.5
        b"\x93",  # array(3): the events
        b"\x8a",  # map(10): BlockStored
        _s("type") + _s("BlockStored"),
        _s("block_hashes") + b"\x92\x01\xcf" + b"\xff" * 8,  # [1, 2**64 - 1] (uint64)
        _s("parent_block_hash") + b"\xc0",
        _s("token_ids") + b"\x92\x01\x02",
        _s("block_size") + b"\x01",
        _s("lora_id") + b"\xc0",
        _s("medium") + _s("GPU"),
        _s("lora_name") + b"\xc0",
        _s("extra_keys") + b"\x92\x91" + _s("s") + b"\xc0",  # [["s"], null]
        _s("group_idx") + b"\x00",
        b"\x84",  # map(4): BlockRemoved
        _s("type") + _s("BlockRemoved"),
        _s("block_hashes") + b"\x91\x07",
        _s("medium") + _s("GPU"),
        _s("group_idx") + b"\x00",
        b"\x81" + _s("type") + _s("AllBlocksCleared"),  # map(1)
        b"\x00",  # data_parallel_rank 0
    ]
)


def _golden_events() -> list[Any]:
    return [
        WireBlockStored(
            block_hashes=[1, 2**64 - 1],
            parent_block_hash=None,
            token_ids=[1, 2],
            block_size=1,
            lora_id=None,
            medium="GPU",
            lora_name=None,
            extra_keys=[("s",), None],
            group_idx=0,
        ),
        WireBlockRemoved(block_hashes=[7], medium="GPU", group_idx=0),
        WireAllBlocksCleared(),
    ]


def test_batch_bytes_are_exactly_vllms() -> None:
    """A batch encodes to the bytes vLLM 0.32 produces: an array, events as maps, type first."""
    assert encode_batch(1.5, _golden_events(), 0) == GOLDEN


def test_sidecar_decodes_the_golden_batch() -> None:
    """The sidecar reads vLLM's bytes: hashes, parent, tier, removals and the clear."""
    batch = decode_batch(GOLDEN)
    assert batch.ts == 1.5
    assert batch.data_parallel_rank == 0
    assert batch.events == (Stored((1, 2**64 - 1), None, "GPU"), Removed((7,), "GPU"), Cleared())


def test_stored_event_carries_what_vllm_puts_in_it() -> None:
    """Low-64-bit hashes, the salt as block 0's extra key, GPU tier, group 0, the new tokens."""
    tokens = list(range(10))
    (event,) = _cache_events_with(tokens, "tenant-salt", block_size=4, seed="seed")
    assert isinstance(event, BlockStored)
    wire = wire_event(event)
    assert isinstance(wire, WireBlockStored)
    chain = BlockHasher(4, "seed").chain(tokens, "tenant-salt")
    assert (
        wire.block_hashes
        == [low64(h) for h in chain]
        == [int.from_bytes(h, "big") & (2**64 - 1) for h in chain]
    )
    assert wire.parent_block_hash is None
    assert wire.token_ids == tokens[:8]
    assert (wire.block_size, wire.medium, wire.group_idx) == (4, "GPU", 0)
    assert wire.extra_keys == [("tenant-salt",), None]
    assert (wire.lora_id, wire.lora_name) == (None, None)


# docs/kv-events.md, "Worked example": these numbers and bytes are printed there.
EXAMPLE_HASHES = [7106486985522270090, 8070739004171031007]
EXAMPLE_PAYLOAD = bytes.fromhex(
    "93cb41da556e40100000918aa474797065ab426c6f636b53746f726564ac626c6f636b5f686173686573"
    "92cf629f5042f4fdcf8acf7001065d1a8111dfb1706172656e745f626c6f636b5f68617368c0a9746f6b"
    "656e5f6964739865666768696a6b6caa626c6f636b5f73697a6504a76c6f72615f6964c0a66d656469756d"
    "a3475055a96c6f72615f6e616d65c0aa65787472615f6b6579739291a27331c0a967726f75705f69647800"
    "00"
)


def test_documented_worked_example_is_what_the_simulator_sends() -> None:
    """The salted 9-token prompt of the docs hashes and encodes exactly as documented."""
    (event,) = _cache_events_with(list(range(101, 110)), "s1", block_size=4, seed="vllm-none-hash")
    wire = wire_event(event)
    assert isinstance(wire, WireBlockStored)
    assert wire.block_hashes == EXAMPLE_HASHES
    assert encode_batch(1767225600.25, [wire]) == EXAMPLE_PAYLOAD
    assert len(EXAMPLE_PAYLOAD) == 171


def _cache_events_with(
    tokens: list[int], salt: str | None, *, block_size: int, seed: str
) -> list[CacheEvent]:
    seen: list[CacheEvent] = []
    cache = PrefixCache(8, BlockHasher(block_size, seed), [seen.append])
    cache.admit(tokens, cache.hasher.chain(tokens, salt), salt, max_new_tokens=1)
    return seen


def test_continuation_names_its_parent_and_has_no_salt_key() -> None:
    """Blocks stored after block 0 name the previous block as parent; no extra keys are set."""
    event = BlockStored((b"\x01" * 32,), b"\x02" * 32, (1, 2, 3, 4), 4, cache_salt="s")
    wire = wire_event(event)
    assert isinstance(wire, WireBlockStored)
    assert wire.parent_block_hash == low64(b"\x02" * 32)
    assert wire.extra_keys == [None]


def test_round_trip_from_simulator_to_sidecar() -> None:
    """What the simulator's cache stores, removes and clears is what the sidecar decodes."""
    events: list[CacheEvent] = [
        BlockStored((b"\xaa" * 32, b"\xbb" * 32), None, tuple(range(8)), 4),
        BlockRemoved((b"\xaa" * 32,)),
        AllBlocksCleared(),
    ]
    batch = decode_batch(encode_batch(12.25, [wire_event(e) for e in events]))
    assert batch.events == (
        Stored((low64(b"\xaa" * 32), low64(b"\xbb" * 32)), None, "GPU"),
        Removed((low64(b"\xaa" * 32),), "GPU"),
        Cleared(),
    )
    assert batch.ts == 12.25


def test_older_array_events_and_raw_digests_decode() -> None:
    """Events as arrays (tag first, older vLLM) and bytes hashes (int hashes off) are read."""
    digest = hashlib.sha256(b"block").digest()
    payload = msgspec.msgpack.encode(
        [
            3.0,
            [
                ["BlockStored", [digest], None, [1, 2], 2, None],
                ["BlockRemoved", [5], "GPU"],
                ["AllBlocksCleared"],
                {"type": "SomethingNew", "x": 1},
            ],
        ]
    )
    batch = decode_batch(payload)
    assert batch.events == (Stored((low64(digest),), None, None), Removed((5,), "GPU"), Cleared())
    assert batch.unknown == 1
    assert batch.data_parallel_rank is None


@pytest.mark.parametrize(
    "payload",
    [b"\xc1", msgspec.msgpack.encode("text"), msgspec.msgpack.encode([1.0, [[]]])],
)
def test_garbage_is_a_decode_error(payload: bytes) -> None:
    """A payload that is not a batch raises DecodeError (and is never half applied)."""
    with pytest.raises(DecodeError):
        decode_batch(payload)


@pytest.mark.parametrize(
    ("endpoint", "binds", "plan"),
    [
        ("tcp://*:5557", True, ("connect", "tcp://127.0.0.1:5557")),
        ("tcp://[::]:5557", True, ("connect", "tcp://[::1]:5557")),
        ("ipc:///run/kv.sock", True, ("connect", "ipc:///run/kv.sock")),
        ("inproc://kv", True, ("connect", "inproc://kv")),
        ("tcp://127.0.0.1:5557", False, ("bind", "tcp://127.0.0.1:5557")),
        ("tcp://router-host:5557", False, ("bind", "tcp://router-host:5557")),
    ],
)
def test_sidecar_does_the_complement_of_the_publisher(
    endpoint: str, binds: bool, plan: tuple[str, str]
) -> None:
    """A binding publisher is connected to (wildcards via loopback); a connecting one is bound."""
    assert sim_publisher_binds(endpoint) is binds
    assert sidecar_wire.publisher_binds(endpoint) is binds
    assert subscriber_plan(endpoint) == plan


def test_endpoint_mode_overrides_the_complement() -> None:
    """--endpoint-mode connect reaches a publisher bound elsewhere by its concrete address."""
    assert subscriber_plan("tcp://worker-0:5557", "connect") == ("connect", "tcp://worker-0:5557")
    assert subscriber_plan("tcp://*:5557", "bind") == ("bind", "tcp://*:5557")


# ---- the publisher's sockets -------------------------------------------------------------------


async def _until(predicate: Callable[[], bool], deadline_s: float = 5.0) -> None:
    """Poll ``predicate`` until it holds, failing after ``deadline_s``."""
    async with asyncio.timeout(deadline_s):
        while not predicate():  # noqa: ASYNC110 - state changes in other tasks, no event to await
            await asyncio.sleep(0.01)


async def test_live_frames_are_topic_sequence_payload(tmp_path: Path) -> None:
    """Each batch goes out as [topic, 8-byte big-endian sequence, msgpack], numbered from 0."""
    config = KvEventsConfig(endpoint=f"ipc://{tmp_path}/ev", topic="kv@w1")
    publisher = KvEventPublisher(config, clock=lambda: 2.0)
    await publisher.start()
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@w1")
    sub.connect(publisher.endpoint)
    try:
        frames: list[bytes] = []
        async with asyncio.timeout(10):
            # A new subscriber misses what is sent before its subscription arrives: keep
            # publishing until one batch gets through.
            while not frames:
                publisher.listener(AllBlocksCleared())
                publisher.flush()
                if await sub.poll(50):
                    frames = await sub.recv_multipart()
        topic, seq, payload = frames
        assert topic == b"kv@w1"
        assert len(seq) == 8
        assert payload == encode_batch(2.0, [WireAllBlocksCleared()])
        publisher.listener(BlockRemoved((b"\x01" * 32,)))
        publisher.flush()
        following = await asyncio.wait_for(sub.recv_multipart(), 5)
        assert int.from_bytes(following[1], "big") == int.from_bytes(seq, "big") + 1
        assert publisher.state()["next_seq"] == int.from_bytes(seq, "big") + 2
    finally:
        sub.close(linger=0)
        ctx.term()
        await publisher.close()


async def test_wildcard_port_zero_binds_a_free_port_and_reports_it() -> None:
    """tcp://*:0 binds the configured host on a free port; the bound address is reported."""
    publisher = KvEventPublisher(KvEventsConfig(endpoint="tcp://*:0", replay_endpoint="tcp://*:0"))
    await publisher.start()
    try:
        assert publisher.endpoint.startswith("tcp://127.0.0.1:")
        assert not publisher.endpoint.endswith(":0")
        assert publisher.replay_endpoint is not None
        assert publisher.replay_endpoint.startswith("tcp://127.0.0.1:")
        assert publisher.state()["endpoint"] == publisher.endpoint
    finally:
        await publisher.close()


def test_simulator_publishes_nothing_by_default() -> None:
    """Without --kv-events-endpoint the cache has no listener and /sim/state shows null."""
    app = create_app(SimConfig(worker_id="w"))
    assert app[SIM_STATE].cache.listeners == []
    assert app[SIM_STATE].kv_events is None


async def test_events_of_one_loop_turn_make_one_batch(tmp_path: Path) -> None:
    """Events raised in the same turn of the event loop are published together, as one step."""
    publisher = KvEventPublisher(KvEventsConfig(endpoint=f"ipc://{tmp_path}/ev"))
    await publisher.start()
    try:
        publisher.listener(BlockRemoved((b"\x01" * 32,)))
        publisher.listener(BlockRemoved((b"\x02" * 32,)))
        await _until(lambda: publisher.next_seq == 1)
        await asyncio.sleep(0)
        assert publisher.next_seq == 1
        assert publisher.events_published == 2
    finally:
        await publisher.close()


async def _replay(endpoint: str, start: int) -> list[list[bytes]]:
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    replies: list[list[bytes]] = []
    try:
        await dealer.send_multipart([b"", start.to_bytes(8, "big")])
        async with asyncio.timeout(5):
            while not replies or replies[-1][2] != END_SEQ:
                replies.append(await dealer.recv_multipart())
    finally:
        dealer.close(linger=0)
        ctx.term()
    return replies


async def test_replay_resends_buffered_batches_from_the_requested_sequence(
    tmp_path: Path,
) -> None:
    """The replay endpoint answers ["", topic, seq, payload] per batch >= start, then an end."""
    config = KvEventsConfig(
        endpoint=f"ipc://{tmp_path}/ev", topic="t", replay_endpoint=f"ipc://{tmp_path}/rep"
    )
    publisher = KvEventPublisher(config, clock=lambda: 1.0)
    await publisher.start()
    try:
        for _ in range(4):
            publisher.listener(AllBlocksCleared())
            publisher.flush()
        assert publisher.replay_endpoint is not None
        replies = await _replay(publisher.replay_endpoint, 2)
    finally:
        await publisher.close()
    payload = encode_batch(1.0, [WireAllBlocksCleared()])
    assert replies == [
        [b"", b"t", (2).to_bytes(8, "big"), payload],
        [b"", b"t", (3).to_bytes(8, "big"), payload],
        [b"", b"", (-1).to_bytes(8, "big", signed=True), b""],
    ]


# ---- decisions (pure) --------------------------------------------------------------------------


def test_sequence_verdicts() -> None:
    """Next applies; a jump is a gap; going back or a jump after a disconnect is a restart."""
    tracker = SequenceTracker()
    first = tracker.check(0)
    assert (first.kind, first.clear_first, first.missing) == ("start", True, range(0))
    tracker.advance(0)
    assert tracker.check(1).kind == "next"
    tracker.advance(1)
    gap = tracker.check(4)
    assert (gap.kind, gap.clear_first, gap.missing) == ("gap", False, range(2, 4))
    tracker.advance(4)
    back = tracker.check(0)
    assert (back.kind, back.clear_first, back.missing) == ("restart", True, range(0))
    assert tracker.check(4).kind == "restart"  # the same number again is a new publisher too
    tracker.peer_lost()
    assert tracker.check(5).kind == "next"  # the same publisher, reconnected, continues
    after = tracker.check(9)
    assert (after.kind, after.missing) == ("restart", range(9))


def test_joining_late_asks_for_the_whole_history() -> None:
    """A sidecar whose first batch is n clears and wants batches 0..n-1 replayed."""
    verdict = SequenceTracker().check(7)
    assert (verdict.kind, verdict.clear_first, verdict.missing) == ("start", True, range(7))


def test_batch_ops_merge_removals_and_skip_other_tiers() -> None:
    """Consecutive removals become one call; CPU-tier events are skipped; order is kept."""
    ops, skipped = batch_ops(
        [
            Stored((1, 2), None, "GPU"),
            Removed((3,), "GPU"),
            Removed((4,), None),
            Stored((9,), None, "CPU"),
            Removed((5,), "GPU"),
            Cleared(),
        ]
    )
    assert ops == [
        IndexOp("record", (1, 2)),
        IndexOp("remove", (3, 4, 5), events=3),
        IndexOp("clear"),
    ]
    assert skipped == 1


def test_backlog_overflow_drops_everything_for_one_clear() -> None:
    """Past the limit, waiting operations are dropped and counted, and a clear goes first."""
    pending = PendingOps(limit=2)
    assert pending.push(IndexOp("record", (1,))) == 0
    assert pending.push(IndexOp("remove", (1,), events=2)) == 0
    assert pending.push(IndexOp("record", (3,))) == 3
    taken = [pending.take() for _ in range(3)]
    assert [t[0] if t else None for t in taken] == [
        IndexOp("clear", events=0),
        IndexOp("record", (3,)),
        None,
    ]


def test_a_clear_supersedes_what_waits_and_what_failed() -> None:
    """A clear empties the queue; an operation that failed meanwhile is not put back."""
    pending = PendingOps(limit=10)
    pending.push(IndexOp("record", (1,)))
    taken = pending.take()
    assert taken is not None
    pending.push(IndexOp("record", (2,)))
    pending.push(IndexOp("clear"))
    pending.retry(*taken)
    assert len(pending) == 1
    first = pending.take()
    assert first is not None
    pending.retry(*first)
    assert len(pending) == 1


# ---- the sidecar against a fake index ----------------------------------------------------------


class FakeIndex:
    """Logs operations; refuses them with IndexUnavailable while ``up`` is False."""

    def __init__(self) -> None:
        self.up = True
        self.ops: list[tuple[Any, ...]] = []
        self.refused = 0

    @property
    def available(self) -> bool:
        return self.up

    def _check(self) -> None:
        if not self.up:
            self.refused += 1
            raise IndexUnavailable("down")

    async def record(self, worker: Any, chain: Sequence[int], source: Any) -> None:
        self._check()
        self.ops.append(("record", worker, tuple(chain), source))

    async def remove(self, worker: Any, hashes: Sequence[int]) -> None:
        self._check()
        self.ops.append(("remove", worker, tuple(hashes)))

    async def clear(self, worker: Any) -> None:
        self._check()
        self.ops.append(("clear", worker))


def _frame(seq: int, *events: Any, topic: bytes = b"") -> list[bytes]:
    return [topic, seq.to_bytes(8, "big"), encode_batch(1.0, list(events))]


def _stored(*hashes: int) -> WireBlockStored:
    return WireBlockStored(list(hashes), None, [0] * len(hashes), 1, None, "GPU", None)


def _sample(metrics: SidecarMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"worker": "w", **labels})
    return value or 0.0


async def _handle(sidecar: KvEventsSidecar, frames: list[bytes]) -> None:
    """Hand one message to the sidecar and wait until the index has taken it."""
    await sidecar.handle(frames)
    await _until(lambda: sidecar.backlog == 0)


@pytest.fixture
async def sidecar_factory(tmp_path: Path) -> Any:
    started: list[KvEventsSidecar] = []

    async def make(index: FakeIndex, **options: Any) -> KvEventsSidecar:
        config = SidecarConfig(
            worker_id="w",
            endpoint="tcp://127.0.0.1:0",
            redis_url="redis://unused",
            replay_timeout_s=1.0,
            **options,
        )
        sidecar = KvEventsSidecar(config, index, SidecarMetrics("w"))
        await sidecar.start()
        started.append(sidecar)
        return sidecar

    yield make
    for sidecar in started:
        await sidecar.stop(0.0)


async def test_events_reach_the_index_in_order(sidecar_factory: Any) -> None:
    """A fresh sidecar clears the worker, then records, removes and clears as told."""
    index = FakeIndex()
    sidecar = await sidecar_factory(index)
    assert sidecar.mode == "bind"
    assert sidecar.subscribed.startswith("tcp://127.0.0.1:")
    await _handle(sidecar, _frame(0, _stored(1, 2)))
    await _handle(sidecar, _frame(1, WireBlockRemoved([2], "GPU")))
    await _handle(sidecar, _frame(2, WireAllBlocksCleared()))
    assert index.ops == [
        ("clear", "w"),
        ("record", "w", (1, 2), "confirmed"),
        ("remove", "w", (2,)),
        ("clear", "w"),
    ]
    metrics = sidecar.metrics
    assert _sample(metrics, "prefix_router_kv_events_applied_total", type="BlockStored") == 1
    assert _sample(metrics, "prefix_router_kv_events_last_seq") == 2


async def test_gap_without_replay_clears_the_worker(sidecar_factory: Any) -> None:
    """Missed batches and no replay endpoint: the worker is cleared and a resync counted."""
    index = FakeIndex()
    sidecar = await sidecar_factory(index)
    await _handle(sidecar, _frame(0, _stored(1)))
    await _handle(sidecar, _frame(3, _stored(7)))
    assert [op[0] for op in index.ops] == ["clear", "record", "clear", "record"]
    assert index.ops[-1][2] == (7,)
    metrics = sidecar.metrics
    assert _sample(metrics, "prefix_router_kv_events_gaps_total") == 1
    assert _sample(metrics, "prefix_router_kv_events_resyncs_total", method="clear") == 1


async def test_sequence_going_back_is_a_restart(sidecar_factory: Any) -> None:
    """A publisher that starts over at 0 makes the sidecar forget the worker's old blocks."""
    index = FakeIndex()
    sidecar = await sidecar_factory(index)
    await _handle(sidecar, _frame(0, _stored(1)))
    await _handle(sidecar, _frame(1, _stored(2)))
    await _handle(sidecar, _frame(0, _stored(3)))
    assert [op[0] for op in index.ops] == ["clear", "record", "record", "clear", "record"]
    assert _sample(sidecar.metrics, "prefix_router_kv_events_restarts_total") == 1


async def test_other_topics_and_bad_messages_are_skipped(sidecar_factory: Any) -> None:
    """Only the configured topic is applied; malformed messages are counted, not fatal."""
    index = FakeIndex()
    sidecar = await sidecar_factory(index, topic="mine")
    await sidecar.handle(_frame(0, _stored(1), topic=b"mine-too"))
    await sidecar.handle([b"mine", b"\x00"])
    await sidecar.handle([b"mine", (0).to_bytes(8, "big"), b"\xc1"])
    await sidecar.handle(_frame(0, _stored(2), topic=b"mine"))
    await _until(lambda: len(index.ops) == 2)
    assert index.ops[1] == ("record", "w", (2,), "confirmed")
    metrics = sidecar.metrics
    assert _sample(metrics, "prefix_router_kv_events_ignored_total", reason="topic") == 1
    assert _sample(metrics, "prefix_router_kv_events_decode_errors_total") == 2


async def test_redis_outage_holds_operations_then_applies_them(sidecar_factory: Any) -> None:
    """While the index is down operations wait; once it is back they land in order."""
    index = FakeIndex()
    index.up = False
    sidecar = await sidecar_factory(index)
    await sidecar.handle(_frame(0, _stored(1)))
    await sidecar.handle(_frame(1, WireBlockRemoved([1], "GPU")))
    await _until(lambda: index.refused >= 3)  # retried a few times: still one outage
    assert index.ops == []
    assert sidecar.backlog == 3
    assert _sample(sidecar.metrics, "prefix_router_kv_events_redis_errors_total") == 1
    index.up = True
    await _until(lambda: len(index.ops) == 3)
    assert [op[0] for op in index.ops] == ["clear", "record", "remove"]
    assert _sample(sidecar.metrics, "prefix_router_kv_events_redis_errors_total") == 1
    assert await sidecar.stop(1.0)


async def test_long_outage_drops_events_for_one_clear(sidecar_factory: Any) -> None:
    """A backlog past --max-pending is dropped (counted) and replaced by a clear of the worker."""
    index = FakeIndex()
    index.up = False
    sidecar = await sidecar_factory(index, max_pending=2)
    for seq in range(4):
        await sidecar.handle(_frame(seq, _stored(seq + 10)))
    index.up = True
    await _until(lambda: sidecar.backlog == 0)
    assert _sample(sidecar.metrics, "prefix_router_kv_events_dropped_total") >= 1
    assert index.ops[0] == ("clear", "w")
    assert index.ops[-1] == ("record", "w", (13,), "confirmed")


async def test_stop_reports_what_could_not_be_applied(sidecar_factory: Any) -> None:
    """With Redis down at shutdown, stop gives up after its deadline instead of hanging."""
    index = FakeIndex()
    index.up = False
    sidecar = await sidecar_factory(index)
    await sidecar.handle(_frame(0, _stored(1)))
    assert await sidecar.stop(0.2) is False


async def test_gap_is_filled_from_the_replay_endpoint(tmp_path: Path, sidecar_factory: Any) -> None:
    """Missed batches are fetched from the publisher's replay endpoint and applied in order."""
    config = KvEventsConfig(
        endpoint=f"ipc://{tmp_path}/ev", replay_endpoint=f"ipc://{tmp_path}/rep"
    )
    publisher = KvEventPublisher(config)
    await publisher.start()
    try:
        hashes = [b"%c" % i * 32 for i in range(5)]
        for block_hash in hashes:
            publisher.listener(BlockStored((block_hash,), None, (0,), 1))
            publisher.flush()
        index = FakeIndex()
        sidecar = await sidecar_factory(index, replay_endpoint=publisher.replay_endpoint)
        live = [wire_event(BlockStored((h,), None, (0,), 1)) for h in hashes]
        await sidecar.handle(_frame(0, live[0]))
        await sidecar.handle(_frame(4, live[4]))
        await _until(lambda: len(index.ops) == 6)
    finally:
        await publisher.close()
    assert index.ops[0] == ("clear", "w")
    assert [op[2] for op in index.ops[1:]] == [(low64(h),) for h in hashes]
    metrics = sidecar.metrics
    assert _sample(metrics, "prefix_router_kv_events_resyncs_total", method="replay") == 1
    assert _sample(metrics, "prefix_router_kv_events_batches_total", source="replay") == 3


# ---- command line ------------------------------------------------------------------------------


def test_sidecar_flags_and_defaults() -> None:
    """kv-events needs worker, endpoint and Redis; the rest has the documented defaults."""
    args = build_parser().parse_args(
        ["kv-events", "--worker-id", "w", "--endpoint", "tcp://*:5557", "--redis-url", "redis://r"]
    )
    assert (args.topic, args.replay_endpoint, args.endpoint_mode, args.prefix) == (
        "",
        None,
        "auto",
        "pr",
    )
    defaults = {f.name: f.default for f in dataclasses.fields(SidecarConfig)}
    assert args.capacity_blocks == SIDECAR_CAPACITY_BLOCKS == defaults["capacity_blocks"]
    assert args.metrics_port is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["kv-events", "--worker-id", "w", "--endpoint", "tcp://*:1"])


def test_sim_events_are_off_unless_an_endpoint_is_given() -> None:
    """prefix-worker sim publishes nothing by default; the flags mirror vLLM's config."""
    args = build_parser().parse_args(["sim", "--worker-id", "w"])
    assert args.kv_events_endpoint is None
    args = build_parser().parse_args(
        [
            *("sim", "--worker-id", "w", "--kv-events-endpoint", "tcp://*:5557"),
            *("--kv-events-topic", "kv", "--kv-events-replay-endpoint", "tcp://*:5558"),
        ]
    )
    assert (args.kv_events_endpoint, args.kv_events_topic) == ("tcp://*:5557", "kv")
    assert args.kv_events_replay_endpoint == "tcp://*:5558"


def test_sidecar_public_names_are_the_intended_ones() -> None:
    """worker.kv_events exports the sidecar, its config, decoding and the pure decisions."""
    import worker.kv_events

    assert set(worker.kv_events.__all__) == {
        "Batch",
        "Cleared",
        "DecodeError",
        "IndexOp",
        "KvEventsSidecar",
        "PendingOps",
        "Removed",
        "SequenceTracker",
        "SidecarConfig",
        "SidecarMetrics",
        "Stored",
        "Verdict",
        "batch_ops",
        "decode_batch",
        "run_sidecar",
        "subscriber_plan",
    }
    assert all(hasattr(worker.kv_events, name) for name in worker.kv_events.__all__)
