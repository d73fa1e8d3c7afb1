"""``prefix-worker kv-events``: one vLLM worker's KV events, applied to the shared Redis warm index.

A sidecar next to each vLLM worker (or simulator) subscribes to the worker's ZMQ KV events and
keeps that worker's entries in the router's Redis index exact: ``BlockStored`` records the
hashes as *confirmed*, ``BlockRemoved`` removes them, ``AllBlocksCleared`` clears the worker.
Sequence gaps are repaired by replay or by clearing the worker; a publisher restart clears it;
Redis outages are ridden out with a bounded backlog. docs/kv-events.md is the operator's guide.

Modules: `wire` (decoding, endpoint rules), `resync` (sequence and backlog decisions, pure),
`sidecar` (sockets, tasks, counters), `main` (the process: logs, metrics endpoint, signals).
"""

from worker.kv_events.main import run_sidecar
from worker.kv_events.resync import IndexOp, PendingOps, SequenceTracker, Verdict, batch_ops
from worker.kv_events.sidecar import KvEventsSidecar, SidecarConfig, SidecarMetrics
from worker.kv_events.wire import (
    Batch,
    Cleared,
    DecodeError,
    Removed,
    Stored,
    decode_batch,
    subscriber_plan,
)

__all__ = [
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
]
