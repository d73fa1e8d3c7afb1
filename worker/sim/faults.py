"""Faults injected on demand into the inference endpoints (``POST /sim/fault``).

A fault has a mode and applies to the next ``count`` inference requests (None: until reset):
- ``slow``: wait ``delay_ms`` before handling the request.
- ``error``: answer HTTP ``status`` (default 500) with vLLM's error body; for a stream with
  ``after_chunks`` = k, send k chunks, then an in-stream error event and ``[DONE]``, as vLLM
  does when generation fails mid-stream.
- ``hang``: never answer (the request stays open until the client gives up); for a stream
  with ``after_chunks`` = k, send the headers and k chunks, then stall.
- ``crash``: the process exits at once (``os._exit``), dropping every connection; for a stream
  with ``after_chunks`` = k, it exits after writing k chunks.
Health, metrics and the ``/sim`` endpoints are never affected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, cast

FaultMode = Literal["none", "slow", "error", "hang", "crash"]
FAULT_MODES: tuple[FaultMode, ...] = ("none", "slow", "error", "hang", "crash")


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault setting."""

    mode: FaultMode = "none"
    status: int = 500
    delay_ms: int = 0
    count: int | None = None
    after_chunks: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


NO_FAULT = Fault()


def _optional_int(data: dict[str, Any], key: str, minimum: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"'{key}' must be an integer >= {minimum} or null")
    return int(value)


def parse_fault(data: object) -> Fault:
    """Validate a ``POST /sim/fault`` body; raises ValueError with a readable reason."""
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    mode = data.get("mode", "none")
    if mode not in FAULT_MODES:
        raise ValueError(f"'mode' must be one of {', '.join(FAULT_MODES)}")
    status = _optional_int(data, "status", 100)
    if status is not None and status > 599:
        raise ValueError("'status' must be an HTTP status code (100..599)")
    delay_ms = _optional_int(data, "delay_ms", 0)
    return Fault(
        mode=cast(FaultMode, mode),
        status=500 if status is None else status,
        delay_ms=0 if delay_ms is None else delay_ms,
        count=_optional_int(data, "count", 1),
        after_chunks=_optional_int(data, "after_chunks", 0),
    )


class FaultInjector:
    """Holds the active fault and hands it out to requests, counting them down."""

    def __init__(self) -> None:
        self._fault = NO_FAULT

    @property
    def current(self) -> Fault:
        """The active fault, with ``count`` showing how many requests it still affects."""
        return self._fault

    def set(self, fault: Fault) -> None:
        self._fault = NO_FAULT if fault.mode == "none" else fault

    def reset(self) -> None:
        self._fault = NO_FAULT

    def take(self) -> Fault:
        """The fault for the next inference request (``NO_FAULT`` if none)."""
        fault = self._fault
        if fault.mode == "none":
            return NO_FAULT
        if fault.count is not None:
            remaining = fault.count - 1
            self._fault = NO_FAULT if remaining <= 0 else replace(fault, count=remaining)
        return fault
