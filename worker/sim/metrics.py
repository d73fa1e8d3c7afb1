"""vLLM's Prometheus metrics, under vLLM's names and labels, in a registry the app owns.

Names and labels follow vLLM v1's Prometheus logger: every series carries ``model_name``
and ``engine`` ("0"); counters count tokens where vLLM's do (``prefix_cache_queries`` and
``prefix_cache_hits`` are prompt tokens looked up and found); ``kv_cache_usage_perc`` is
the fraction (0..1) of blocks not in the free queue; ``cache_config_info`` is an info-style
gauge fixed at 1 whose labels describe the cache. Gauges are refreshed from the engine
when ``/metrics`` is scraped. `reset` starts every series again from zero.
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from worker.sim.config import SimConfig
from worker.sim.engine import FinishReason, SimRequest

__all__ = ["PROMETHEUS_CONTENT_TYPE", "SimMetrics"]

_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
_LABELS = ("model_name", "engine")
_ENGINE = "0"


class EngineState(Protocol):
    """What the gauges read at scrape time."""

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...


class CacheState(Protocol):
    @property
    def usage(self) -> float: ...


class _Series:
    """One generation of the metric objects (replaced wholesale on reset)."""

    def __init__(self, config: SimConfig) -> None:
        registry = CollectorRegistry(auto_describe=True)
        labels = (config.model, _ENGINE)
        self.registry = registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, _LABELS, registry=registry)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, _LABELS, registry=registry)

        self.running = gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
        )
        self.queries = counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in prompt tokens queried."
        )
        self.hits = counter("vllm:prefix_cache_hits", "Prefix cache hits, in cached tokens.")
        self.preemptions = counter("vllm:num_preemptions", "Preemptions (always 0 here).")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generation tokens made.")
        success = Counter(
            "vllm:request_success",
            "Successfully processed requests.",
            (*_LABELS, "finished_reason"),
            registry=registry,
        )
        self.success = {
            reason: success.labels(config.model, _ENGINE, reason)
            for reason in ("stop", "length", "abort")
        }
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token in seconds.",
            _LABELS,
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency in seconds.",
            _LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Time spent waiting before admission, in seconds.",
            _LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        info = {
            "block_size": str(config.block_size),
            "cache_dtype": "auto",
            "enable_prefix_caching": "True",
            "num_gpu_blocks": str(config.cache_blocks),
            "num_cpu_blocks": "None",
            "prefix_caching_hash_algo": "sha256",
            "engine": _ENGINE,
        }
        Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            tuple(info),
            registry=registry,
        ).labels(**info).set(1)
        # Bound children: one dict lookup saved per event on the hot path.
        self.running_l = self.running.labels(*labels)
        self.waiting_l = self.waiting.labels(*labels)
        self.kv_usage_l = self.kv_usage.labels(*labels)
        self.queries_l = self.queries.labels(*labels)
        self.hits_l = self.hits.labels(*labels)
        self.preemptions.labels(*labels)
        self.prompt_tokens_l = self.prompt_tokens.labels(*labels)
        self.generation_tokens_l = self.generation_tokens.labels(*labels)
        self.ttft_l = self.ttft.labels(*labels)
        self.e2e_l = self.e2e.labels(*labels)
        self.queue_time_l = self.queue_time.labels(*labels)


class SimMetrics:
    """The engine observer that keeps vLLM's metrics; renders the exposition text."""

    def __init__(self, config: SimConfig) -> None:
        self._config = config
        self._series = _Series(config)

    def reset(self) -> None:
        """Start every series from zero (``POST /sim/reset``)."""
        self._series = _Series(config=self._config)

    def render(self, engine: EngineState, cache: CacheState) -> bytes:
        """Refresh the gauges and return the Prometheus text exposition."""
        series = self._series
        series.running_l.set(engine.num_running)
        series.waiting_l.set(engine.num_waiting)
        series.kv_usage_l.set(cache.usage)
        return generate_latest(series.registry)

    # ---- EngineObserver ----------------------------------------------------------------

    def on_admitted(self, request: SimRequest) -> None:
        series = self._series
        series.queries_l.inc(len(request.prompt))
        if request.cached_tokens:
            series.hits_l.inc(request.cached_tokens)
        if request.admitted_at is not None:
            series.queue_time_l.observe(request.admitted_at - request.arrival)

    def on_first_token(self, request: SimRequest) -> None:
        series = self._series
        series.prompt_tokens_l.inc(len(request.prompt))
        series.ttft_l.observe(max(0.0, request.first_token_at - request.arrival))

    def on_tokens(self, request: SimRequest, count: int) -> None:
        self._series.generation_tokens_l.inc(count)

    def on_finished(self, request: SimRequest, reason: FinishReason) -> None:
        # vLLM does not count client aborts as successes.
        if reason == "abort":
            return
        series = self._series
        series.success[reason].inc()
        if request.finished_at is not None:
            series.e2e_l.observe(max(0.0, request.finished_at - request.arrival))
