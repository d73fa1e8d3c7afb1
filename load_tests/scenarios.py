"""Named load-test scenarios: a workload, a cluster, and what happens to it during the run.

Each scenario isolates one thing that separates routers in production (docs/load-tests.md
has the table and what to look for in each). All are seeded: the same scenario gives the
same trace, byte for byte, so every router in a comparison sees exactly the same requests.

The cluster is `prefix-worker sim` workers with the simulator's default cost model (20 us
of prefill per uncached prompt token, 1.5 ms per output token); cache sizes are chosen per
scenario against the tenants' prompt heads, because the ratio of working set to cache is
what decides whether routing matters at all.

Every scenario has a *short* form (`Scenario.short`): the same shape scaled down to a few
seconds and small heads, which the default test suite runs to check the harness itself
(the oracle bound holds, counts add up, the report is written), not performance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from load_tests.workload import Trace, WorkloadConfig, generate_trace

ChurnAction = Literal["add", "remove", "crash"]
VERSION_HEADER = "x-prefix-version"


@dataclass(frozen=True, slots=True)
class ChurnEvent:
    """At ``at`` (a fraction of the run's duration), do ``action`` to worker ``worker``.

    ``add`` brings in a spare worker (started with the cluster, unknown to the routers until
    then), ``remove`` takes a worker out of the routers' lists (it keeps serving what it has
    in flight), ``crash`` kills its process (SIGKILL; the routers must notice by themselves).
    """

    at: float
    action: ChurnAction
    worker: str

    def __post_init__(self) -> None:
        if not 0.0 < self.at < 1.0:
            raise ValueError("churn times are fractions of the run, in (0, 1)")


@dataclass(frozen=True, slots=True)
class Scenario:
    """One named configuration of workload, cluster and events."""

    name: str
    summary: str
    """One line: what the scenario shows."""
    workload: WorkloadConfig
    workers: int = 4
    spare_workers: int = 0
    """Started with the cluster but unknown to the routers until a churn event adds them."""
    cache_blocks: int = 6144
    """KV blocks per worker."""
    block_size: int = 16
    prefill_us_per_token: float = 20.0
    decode_ms_per_token: float = 1.5
    max_running: int = 256
    replicas: int = 1
    """Router processes behind one ingress (requests spread round robin across them)."""
    churn: tuple[ChurnEvent, ...] = ()
    concurrency: int = 64
    router_settings: dict[str, Any] = field(default_factory=dict)
    """Extra settings for our router, merged over the harness's (e.g. a Redis index)."""
    trace_builder: Callable[[WorkloadConfig], Trace] | None = None
    """Builds the trace when the plain generator does not (None: `generate_trace`)."""
    short_overrides: dict[str, Any] = field(default_factory=dict)
    """Workload fields changed by `short` on top of the common scaling."""

    @property
    def duration(self) -> float:
        return self.workload.duration

    @property
    def worker_ids(self) -> list[str]:
        """Ids of all the workers started: the initial ones, then the spares."""
        return [f"w{i}" for i in range(self.workers + self.spare_workers)]

    def trace(self) -> Trace:
        trace = (self.trace_builder or generate_trace)(self.workload)
        trace.meta["scenario"] = self.name
        return trace

    def with_duration(self, duration: float) -> Scenario:
        return dataclasses.replace(
            self, workload=dataclasses.replace(self.workload, duration=duration)
        )

    def short(self) -> Scenario:
        """The same shape in a few seconds: small heads and caches, a light rate."""
        scale = {
            "duration": 3.0,
            "rate": 8.0,
            "tenants": min(self.workload.tenants, 8),
            "head_tokens": (200, 400),
            "burst_every": 1.5,
            "burst_length": 0.3,
            **({"rollout_at": 1.5} if self.workload.rollout_at is not None else {}),
            **self.short_overrides,
        }
        # Keep the working set to cache ratio: heads shrink ~12x, so do caches.
        cache = max(64, self.cache_blocks // 12)
        return dataclasses.replace(
            self,
            workload=dataclasses.replace(self.workload, **scale),
            cache_blocks=cache,
            concurrency=16,
        )

    def describe(self) -> dict[str, Any]:
        """What the report prints about the scenario."""
        return {
            "name": self.name,
            "summary": self.summary,
            "workers": self.workers,
            "spare_workers": self.spare_workers,
            "cache_blocks": self.cache_blocks,
            "block_size": self.block_size,
            "replicas": self.replicas,
            "churn": [dataclasses.asdict(e) for e in self.churn],
            "concurrency": self.concurrency,
            "workload": self.workload.to_json(),
        }


def _workload(**changes: Any) -> WorkloadConfig:
    """The common traffic shape (the demo's), with ``changes``."""
    base: dict[str, Any] = {
        "seed": 11,
        "tenants": 48,
        "zipf_exponent": 0.6,
        "head_tokens": (3000, 6000),
        "rate": 30.0,
        "duration": 30.0,
        "stream_fraction": 0.9,
    }
    return WorkloadConfig(**{**base, **changes})


def _shape_trace(config: WorkloadConfig, id_position: str) -> Trace:
    # Imported here: the prompt-shape generator is its own module (the advisor's scenario).
    from load_tests.shapes import ShapeConfig, shape_trace

    low, high = config.head_tokens
    shape = ShapeConfig(
        seed=config.seed,
        requests=max(4, round(config.rate * config.duration)),
        rate=config.rate,
        head_tokens=(low + high) // 2,
        tenants_per_route=max(1, config.tenants // 2),
        id_position="end" if id_position == "end" else "start",
        model=config.model,
    )
    return shape_trace(shape)


def _prompt_shape_trace(config: WorkloadConfig) -> Trace:
    return _shape_trace(config, "start")


def _prompt_shape_fixed_trace(config: WorkloadConfig) -> Trace:
    return _shape_trace(config, "end")


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "many_small_tenants",
            "400 tenants with short heads (300-900 tokens), long-tailed popularity",
            _workload(tenants=400, zipf_exponent=0.9, head_tokens=(300, 900), seed=21),
            short_overrides={"tenants": 24, "head_tokens": (60, 160)},
        ),
        Scenario(
            "hot_tenant",
            "one tenant sends ~60% of the traffic on one prefix: affinity must spill, not pin",
            _workload(tenants=12, zipf_exponent=2.0, rate=40.0, seed=22),
            short_overrides={"rate": 12.0},
        ),
        Scenario(
            "cache_pressure",
            "the tenants' heads are ~2x the whole cluster's KV cache",
            _workload(tenants=64, seed=23),
            cache_blocks=2048,
        ),
        Scenario(
            "worker_churn",
            "a worker is added at 25%, one removed at 50%, one killed at 70% of the run",
            _workload(seed=24),
            spare_workers=1,
            churn=(
                ChurnEvent(0.25, "add", "w4"),
                ChurnEvent(0.5, "remove", "w1"),
                ChurnEvent(0.7, "crash", "w2"),
            ),
        ),
        Scenario(
            "replicas",
            "three router replicas behind an ingress that spreads requests round robin",
            _workload(seed=25),
            replicas=3,
            router_settings={"index": {"kind": "redis"}, "loads": {"kind": "redis"}},
        ),
        Scenario(
            "salted_shared_text",
            "32 tenants in 4 groups send identical text, each with its own cache salt",
            _workload(tenants=32, text_groups=4, client_salt=True, seed=26),
        ),
        Scenario(
            "version_rollout",
            "every tenant moves to a new prefix version halfway: warmup misses, then recovery",
            _workload(rollout_at=15.0, version_every=0.0, version_header=VERSION_HEADER, seed=27),
        ),
        Scenario(
            "prompt_shape",
            "route 'bad' puts a per-request id before a long stable head; route 'good' does not",
            _workload(tenants=8, rate=20.0, seed=28),
            trace_builder=_prompt_shape_trace,
        ),
        Scenario(
            "prompt_shape_fixed",
            "prompt_shape with the per-request id moved after the head (what the advisor says)",
            _workload(tenants=8, rate=20.0, seed=28),
            trace_builder=_prompt_shape_fixed_trace,
        ),
    )
}


def get_scenario(name: str) -> Scenario:
    """The scenario called ``name`` (a `KeyError` names the known ones)."""
    try:
        return SCENARIOS[name]
    except KeyError:
        known = ", ".join(sorted(SCENARIOS))
        raise KeyError(f"unknown scenario {name!r}; known: {known}") from None
