"""What a load run measured: one record per request, load samples, and their file format.

The runner (`load_tests.client`) produces these; the report (`load_tests.report`) reads
only these, so anything that yields records (a live run against our router, a peer router,
or an offline replay) gets the same report. A run file is JSON lines: a header
``{"kind": "run", ...}``, then ``{"kind": "request", ...}`` and ``{"kind": "load", ...}``
lines. A ``.gz`` suffix means gzip.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from load_tests.jsonl import open_text

ROUTER_WORKER_HEADER = "x-prefix-router-worker"
ROUTER_DECISION_HEADER = "x-prefix-router-decision"
WORKER_ID_HEADER = "x-worker-id"
"""Set by `prefix-worker sim` on every response: attributes a request to a worker behind a
router that does not say where it sent it (the peer routers pass it through)."""
NOT_SENT = "not sent: run deadline"
"""Error of a request the run never sent (its deadline came first)."""
CANCELLED = "cancelled: run deadline"
"""Error of a request still in flight when the run's deadline came."""


@dataclass(frozen=True, slots=True)
class DecisionInfo:
    """The router's ``x-prefix-router-decision`` header, parsed.

    Format: ``<reason>; policy=<p>; matched=<m>; best=<b>; blocks=<n>; load=<l>; cap=<c>``
    (``cap`` may be ``-``). Unknown keys are ignored; missing numbers are None.
    """

    reason: str
    policy: str | None = None
    matched: int | None = None
    best: int | None = None
    blocks: int | None = None
    load: int | None = None
    cap: int | None = None


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def parse_decision(value: str | None) -> DecisionInfo | None:
    """Parse a decision header; None when absent or empty (e.g. a peer router)."""
    if not value or not value.strip():
        return None
    parts = [p.strip() for p in value.split(";")]
    fields: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, val = part.partition("=")
        if sep:
            fields[key.strip()] = val.strip()
    return DecisionInfo(
        reason=parts[0],
        policy=fields.get("policy"),
        matched=_int_or_none(fields.get("matched")),
        best=_int_or_none(fields.get("best")),
        blocks=_int_or_none(fields.get("blocks")),
        load=_int_or_none(fields.get("load")),
        cap=_int_or_none(fields.get("cap")),
    )


@dataclass(slots=True)
class RequestRecord:
    """The outcome of one trace request. Times are seconds since the run started."""

    index: int
    tenant: str
    path: str
    stream: bool
    conversation: str | None = None
    turn: int = 0
    prefix_version: int = 0
    scheduled: float = 0.0
    """When the trace said to send it."""
    started: float = 0.0
    """When it was actually sent (later than ``scheduled`` if concurrency was saturated)."""
    finished: float = 0.0
    status: int = 0
    """HTTP status; 0 when no response arrived (connect error, timeout, cancelled)."""
    error: str | None = None
    worker: str | None = None
    decision: DecisionInfo | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    ttft: float | None = None
    """Time to the first content chunk (streaming) or the whole response (non-streaming)."""
    itl: list[float] = field(default_factory=list)
    """Gaps between consecutive content chunks (streaming only)."""
    latency: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and 200 <= self.status < 300

    def to_json(self) -> dict[str, Any]:
        obj = dataclasses.asdict(self)
        obj["itl"] = [round(x, 6) for x in self.itl]
        return obj

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RequestRecord:
        values = {f.name: obj[f.name] for f in dataclasses.fields(cls) if f.name in obj}
        decision = values.get("decision")
        values["decision"] = DecisionInfo(**decision) if decision else None
        values["itl"] = [float(x) for x in values.get("itl") or []]
        return cls(**values)


@dataclass(frozen=True, slots=True)
class LoadSample:
    """In-flight requests per worker at one moment (from the router's admin API)."""

    t: float
    inflight: dict[str, int]


@dataclass(slots=True)
class RunResult:
    """Everything one run against one target produced."""

    label: str
    """What was driven: a policy name for our router, or a peer's name."""
    records: list[RequestRecord] = field(default_factory=list)
    load_samples: list[LoadSample] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    """How the run was configured (target, concurrency, duration, ...)."""
    elapsed: float = 0.0
    """Wall time of the whole run in seconds, including the drain."""


def write_run(path: Path | str, run: RunResult) -> Path:
    """Write a run as JSON lines (gzip if the name ends in ``.gz``)."""
    path = Path(path)
    with open_text(path, "w") as out:
        header = {"kind": "run", "label": run.label, "elapsed": run.elapsed, "meta": run.meta}
        out.write(json.dumps(header) + "\n")
        for record in run.records:
            out.write(json.dumps({"kind": "request", **record.to_json()}) + "\n")
        for sample in run.load_samples:
            line = {"kind": "load", "t": round(sample.t, 4), "inflight": sample.inflight}
            out.write(json.dumps(line) + "\n")
    return path


def read_run(path: Path | str) -> RunResult:
    """Read a run written by `write_run`."""
    path = Path(path)
    run = RunResult(label=path.stem)
    with open_text(path, "r") as src:
        for line in src:
            if not line.strip():
                continue
            obj = json.loads(line)
            kind = obj.pop("kind", None)
            if kind == "run":
                run.label = str(obj["label"])
                run.elapsed = float(obj.get("elapsed", 0.0))
                run.meta = dict(obj.get("meta") or {})
            elif kind == "request":
                run.records.append(RequestRecord.from_json(obj))
            elif kind == "load":
                inflight = {str(k): int(v) for k, v in obj["inflight"].items()}
                run.load_samples.append(LoadSample(float(obj["t"]), inflight))
    return run
