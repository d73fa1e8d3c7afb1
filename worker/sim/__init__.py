"""A vLLM-faithful worker simulator: OpenAI API, paged prefix cache, cost model, faults.

It is an independent oracle for the router: nothing here imports from ``router``. See
docs/simulator.md for what it models and how it differs from vLLM.
"""

from worker.sim.cache import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    CacheEvent,
    CacheListener,
    PrefixCache,
)
from worker.sim.config import SimConfig
from worker.sim.server import SIM_STATE, SimState, create_app

__all__ = [
    "SIM_STATE",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "CacheEvent",
    "CacheListener",
    "PrefixCache",
    "SimConfig",
    "SimState",
    "create_app",
]
