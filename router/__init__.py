"""prefix-router: a cache-aware load-balancing router for vLLM workers."""

__version__ = "0.1.0"
