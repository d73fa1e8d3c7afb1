"""The simulator's settings, one frozen tree built once by the CLI (or a test) and passed down.

Each component takes only what it needs from it: the cache takes the block geometry, the
engine the cost model, the HTTP layer the served name and the usage switches, the KV-event
publisher its endpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "sim-model"
DEFAULT_HASH_SEED = "vllm-none-hash"
MAX_DEFAULT_MODEL_LEN = 32768


DEFAULT_KV_EVENTS_BUFFER_STEPS = 10_000
"""Batches kept for replay (vLLM's ``KVEventsConfig.buffer_steps`` default)."""


@dataclass(frozen=True, slots=True)
class KvEventsConfig:
    """Where and how the simulator publishes KV events (vLLM's ``--kv-events-config``)."""

    endpoint: str
    """ZMQ PUB address. Bound when it has a wildcard (``tcp://*:PORT``, ``::``) or is
    ``ipc://``/``inproc://``; connected otherwise (``tcp://HOST:PORT``: the subscriber binds)."""
    topic: str = ""
    """First frame of every message; subscribers filter on it."""
    replay_endpoint: str | None = None
    """ZMQ ROUTER address (always bound) that resends buffered batches on request."""
    buffer_steps: int = DEFAULT_KV_EVENTS_BUFFER_STEPS
    """How many of the latest batches the replay endpoint can resend."""
    bind_host: str = "127.0.0.1"
    """Address bound for ``tcp://*:0`` (vLLM binds the node's IP there); the CLI passes --host."""

    def __post_init__(self) -> None:
        for name, value in (("endpoint", self.endpoint), ("replay_endpoint", self.replay_endpoint)):
            if value is not None and "://" not in value:
                raise ValueError(f"kv-events {name} must be a ZMQ address like tcp://*:5557")
        if self.buffer_steps < 1:
            raise ValueError(f"kv-events buffer_steps must be >= 1, got {self.buffer_steps}")


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything one simulated worker needs to know about itself."""

    worker_id: str
    model: str = DEFAULT_MODEL
    cache_blocks: int = 2048
    """Blocks in the paged KV cache (all usable; see docs/simulator.md on vLLM's null block)."""
    block_size: int = 16
    """Tokens per block; only full blocks are hashed and shared."""
    prefill_us_per_token: float = 20.0
    """Compute cost of one uncached prompt token on the single prefill lane."""
    decode_ms_per_token: float = 1.5
    """Time between two generated tokens of one request (also the fixed cost of a forward pass)."""
    max_running: int = 256
    """Requests admitted at once (vLLM's max_num_seqs); the rest wait FIFO."""
    max_model_len: int | None = None
    """Prompt plus completion limit; None means min(32768, cache_blocks * block_size)."""
    prompt_tokens_details: bool = True
    """Report usage.prompt_tokens_details.cached_tokens (vLLM's --enable-prompt-tokens-details)."""
    hash_seed: str = DEFAULT_HASH_SEED
    """Seed of the root block hash (vLLM's NONE_HASH comes from PYTHONHASHSEED)."""
    stream_interval_ms: float = 5.0
    """Shortest pause between two writes of a stream; tokens due meanwhile go out together."""
    kv_events: KvEventsConfig | None = None
    """Publish KV events in vLLM's wire format; None (the default) publishes nothing."""

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")
        if self.cache_blocks < 1:
            raise ValueError(f"cache_blocks must be >= 1, got {self.cache_blocks}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.prefill_us_per_token < 0 or self.decode_ms_per_token < 0:
            raise ValueError("timing parameters must be >= 0")
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.stream_interval_ms < 0:
            raise ValueError("stream_interval_ms must be >= 0")
        capacity = self.cache_blocks * self.block_size
        if self.max_model_len is not None:
            if self.max_model_len < 1:
                raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
            # vLLM refuses to start when one request of max_model_len cannot fit in the cache;
            # the simulator does the same, so an admitted request can always finish.
            if self.max_model_len > capacity:
                raise ValueError(
                    f"max_model_len {self.max_model_len} does not fit in the KV cache "
                    f"({self.cache_blocks} blocks x {self.block_size} tokens = {capacity})"
                )

    @property
    def effective_max_model_len(self) -> int:
        """The context limit in force."""
        if self.max_model_len is not None:
            return self.max_model_len
        return min(MAX_DEFAULT_MODEL_LEN, self.cache_blocks * self.block_size)
