"""The last inference requests a simulator accepted, for tests and operators (``/sim/requests``).

Each record keeps what a router test needs to check about the forwarded request: the path,
streaming, the ``cache_salt`` received, prompt and cached token counts (cached is filled in
at admission; null before), and the propagated headers ``traceparent`` and ``x-request-id``.
Of ``authorization`` only its presence is kept, never its value. ``block_hashes`` are the
prompt's full-block hashes as KV events carry them (low 64 bits), so tests can look up what
the worker stored; the digests are kept by reference and converted only when shown.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.sim.hashing import low64

DEFAULT_CAPACITY = 1024


@dataclass(eq=False, slots=True)
class RequestRecord:
    """One accepted inference request."""

    path: str
    stream: bool
    cache_salt: str | None
    prompt_tokens: int
    max_tokens: int
    traceparent: str | None
    x_request_id: str | None
    authorization: bool
    fault: str | None
    received_at: float = field(default_factory=time.time)
    cached_tokens: int | None = None
    block_hashes: list[bytes] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "stream": self.stream,
            "cache_salt": self.cache_salt,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "block_hashes": [low64(h) for h in self.block_hashes],
            "max_tokens": self.max_tokens,
            "fault": self.fault,
            "received_at": self.received_at,
            "headers": {
                "traceparent": self.traceparent,
                "x-request-id": self.x_request_id,
                "authorization": self.authorization,
            },
        }


class RequestLog:
    """A bounded ring of `RequestRecord`, oldest first."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._records: deque[RequestRecord] = deque(maxlen=capacity)

    def add(
        self,
        *,
        path: str,
        stream: bool,
        cache_salt: str | None,
        prompt_tokens: int,
        max_tokens: int,
        headers: Mapping[str, str],
        fault: str | None,
    ) -> RequestRecord:
        record = RequestRecord(
            path=path,
            stream=stream,
            cache_salt=cache_salt,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            traceparent=headers.get("traceparent"),
            x_request_id=headers.get("x-request-id"),
            authorization="authorization" in headers,
            fault=fault,
        )
        self._records.append(record)
        return record

    def last(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` records, newest last."""
        if limit <= 0:
            return []
        records = list(self._records)[-limit:]
        return [r.to_json() for r in records]

    def clear(self) -> None:
        self._records.clear()
