"""The KV-event wire format as a subscriber reads it, and vLLM's endpoint rules.

`decode_batch` reads one message's payload (see docs/kv-events.md): the msgpack array
``[ts, events, data_parallel_rank]``, each event a map with a ``type`` key (vLLM 0.32) or an
array with the tag first (older releases). It is lenient where vLLM has changed over time:
unknown fields and event types are skipped, block hashes may be 64-bit ints or raw digests
(``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``) and are reduced to their low 64 bits, the form
the router keys blocks by. It is written apart from the simulator's encoder on purpose, so a
round trip between the two checks both.

Endpoints: vLLM's PUB socket binds an address with a wildcard (``*``, ``::``) or an
``ipc://``/``inproc://`` one and connects to any other; the subscriber does the complement
(`subscriber_plan`). The replay ROUTER always binds, so the subscriber always connects to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import zmq

LOW64 = (1 << 64) - 1

EndpointMode = Literal["auto", "bind", "connect"]


class DecodeError(ValueError):
    """A payload that is not a KV-event batch."""


@dataclass(frozen=True, slots=True)
class Stored:
    """``BlockStored``: blocks registered in the prefix cache, in chain order."""

    hashes: tuple[int, ...]
    parent: int | None
    medium: str | None


@dataclass(frozen=True, slots=True)
class Removed:
    """``BlockRemoved``: blocks evicted from the prefix cache."""

    hashes: tuple[int, ...]
    medium: str | None


@dataclass(frozen=True, slots=True)
class Cleared:
    """``AllBlocksCleared``: the prefix cache was reset."""


Event = Stored | Removed | Cleared


@dataclass(frozen=True, slots=True)
class Batch:
    """One published batch: the events of one engine step."""

    ts: float
    events: tuple[Event, ...]
    data_parallel_rank: int | None
    unknown: int = 0
    """Events of a type this sidecar does not know (skipped)."""


def as_hash(value: Any) -> int:
    """A block hash as the router keys it: the low 64 bits, from an int or a raw digest."""
    if isinstance(value, bool):
        raise DecodeError(f"not a block hash: {value!r}")
    if isinstance(value, int):
        return value & LOW64
    if isinstance(value, bytes):
        return int.from_bytes(value, "big") & LOW64
    raise DecodeError(f"not a block hash: {value!r}")


def _hashes(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise DecodeError(f"block_hashes is not a list: {value!r}")
    return tuple(as_hash(v) for v in value)


def _medium(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def decode_event(raw: Any) -> Event | None:
    """One event (a map with ``type``, or an array with the tag first); None if unknown."""
    if isinstance(raw, dict):
        kind = raw.get("type")
        get = raw.get
        if kind == "BlockStored":
            parent = get("parent_block_hash")
            return Stored(
                _hashes(get("block_hashes")),
                None if parent is None else as_hash(parent),
                _medium(get("medium")),
            )
        if kind == "BlockRemoved":
            return Removed(_hashes(get("block_hashes")), _medium(get("medium")))
    elif isinstance(raw, list) and raw:
        kind = raw[0]
        # Positional: [tag, block_hashes, parent, token_ids, block_size, lora_id, medium, ...]
        if kind == "BlockStored" and len(raw) >= 3:
            medium = _medium(raw[6]) if len(raw) > 6 else None
            return Stored(_hashes(raw[1]), None if raw[2] is None else as_hash(raw[2]), medium)
        if kind == "BlockRemoved" and len(raw) >= 2:
            return Removed(_hashes(raw[1]), _medium(raw[2]) if len(raw) > 2 else None)
    else:
        raise DecodeError(f"not an event: {raw!r}")
    if kind == "AllBlocksCleared":
        return Cleared()
    return None


def decode_batch(payload: bytes) -> Batch:
    """A batch payload: the array ``[ts, events, data_parallel_rank]`` (or the same as a map)."""
    try:
        raw = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"not msgpack: {exc}") from exc
    if isinstance(raw, list) and len(raw) >= 2:
        ts, events, rank = raw[0], raw[1], raw[2] if len(raw) > 2 else None
    elif isinstance(raw, dict) and "events" in raw:
        ts, events, rank = raw.get("ts", 0.0), raw["events"], raw.get("data_parallel_rank")
    else:
        raise DecodeError("not an event batch")
    if not isinstance(events, list) or not isinstance(ts, int | float):
        raise DecodeError("not an event batch")
    decoded = [decode_event(e) for e in events]
    known = tuple(e for e in decoded if e is not None)
    rank = rank if isinstance(rank, int) else None
    return Batch(float(ts), known, rank, unknown=len(decoded) - len(known))


def publisher_binds(endpoint: str) -> bool:
    """vLLM's rule for its PUB socket: bind wildcard, ``::``, ipc and inproc addresses."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def reachable(endpoint: str) -> str:
    """An address to connect to a socket bound at ``endpoint`` (wildcards -> loopback)."""
    return endpoint.replace("tcp://*:", "tcp://127.0.0.1:").replace("tcp://[::]:", "tcp://[::1]:")


def subscriber_plan(endpoint: str, mode: EndpointMode = "auto") -> tuple[str, str]:
    """``(bind|connect, address)`` to meet a publisher configured with ``endpoint``: the
    complement of what it does (``auto``), or what ``mode`` says."""
    if mode == "auto":
        mode = "connect" if publisher_binds(endpoint) else "bind"
    return (mode, reachable(endpoint)) if mode == "connect" else (mode, endpoint)


def prepare_socket(sock: zmq.Socket[Any], endpoint: str) -> None:
    """Enable IPv6 on ``sock`` when ``endpoint`` needs it."""
    if endpoint.startswith("tcp://[") or "::" in endpoint:
        sock.setsockopt(zmq.IPV6, 1)
