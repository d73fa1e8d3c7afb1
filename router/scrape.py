"""What each vLLM worker says about itself on ``/metrics``.

The router's own in-flight counts miss traffic that reaches a worker some other way (another
router, a batch job) and say nothing about how full its KV cache is. The prober reads, every
``health.scrape_interval_s``: ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
``vllm:kv_cache_usage_perc`` (``vllm:gpu_cache_usage_perc`` on older vLLM) and the labels of
``vllm:cache_config_info`` (block size, number of KV blocks). Values are summed over the
``model_name``/``engine`` label sets a worker exports.

`EngineStats.load_floor` folds this into routing: a worker's load is never taken as lower than
what its engine reports running and waiting, as long as that report is fresh.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_CACHE_INFO = "vllm:cache_config_info"


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_usage: float | None
    """Fraction of KV blocks in use (0..1), None when the worker does not export it."""
    block_size: int | None
    num_gpu_blocks: int | None
    scraped_at: float

    def load_floor(self, now: float, max_age_s: float) -> int:
        """Running + waiting, if the scrape is younger than ``max_age_s``; else 0."""
        if now - self.scraped_at > max_age_s:
            return 0
        return self.running + self.waiting


def parse_engine_stats(text: str, scraped_at: float) -> EngineStats:
    """Read the engine gauges out of a Prometheus exposition; unknown metrics are ignored."""
    running = waiting = 0.0
    kv_usage: float | None = None
    block_size: int | None = None
    num_blocks: int | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == _RUNNING:
                running += sample.value
            elif sample.name == _WAITING:
                waiting += sample.value
            elif sample.name in _KV_USAGE:
                kv_usage = max(kv_usage or 0.0, sample.value)
            elif sample.name == _CACHE_INFO:
                block_size = _int_label(sample.labels, "block_size") or block_size
                num_blocks = _int_label(sample.labels, "num_gpu_blocks") or num_blocks
    return EngineStats(int(running), int(waiting), kv_usage, block_size, num_blocks, scraped_at)


def _int_label(labels: dict[str, str], name: str) -> int | None:
    value = labels.get(name)
    if value is None:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None
