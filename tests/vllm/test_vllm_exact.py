"""Real vLLM (CPU build) against the router's exact mode: same tokens, same block hashes.

Two ``prefix-worker vllm`` servers run the tiny local model. For chat and completions
requests, salted or not, the router's `router.exact.ExactHasher` must compute exactly the
block hashes vLLM publishes in ``BlockStored`` KV events, and exactly the token ids vLLM's own
renderer produces. Prefix reuse shows in ``usage.prompt_tokens_details.cached_tokens``: only
on the same worker, and only for the same ``cache_salt``.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.core.vllm_hash import DEFAULT_SEED, VllmBlockHasher
from router.exact import ExactHasher
from tests.vllm.cluster import (
    MODEL_NAME,
    KvEventFeed,
    VllmCluster,
    stored_events,
    stored_hashes,
)
from tests.vllm.conftest import TIER_TIMEOUT_S
from tests.vllm.env import VllmEnv

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(TIER_TIMEOUT_S)]

REFERENCE_SCRIPT = Path(__file__).with_name("vllm_reference.py")
SYSTEM = (
    "You are a helpful assistant. Answer briefly and precisely. The router sends each request "
    "to the worker whose cache already holds its prefix. A key-value cache keeps the attention "
    "keys and values of tokens seen before. Prefix caching reuses blocks across requests. "
    "Tenants are isolated with a salt that changes the hash of the first block. Bounded loads "
    "keep any worker below the cap while respecting affinity."
)


@pytest.fixture(scope="module")
def exact(vllm_cluster: VllmCluster) -> ExactHasher:
    return ExactHasher(vllm_cluster.exact_config())


def chat_body(tag: str, question: str = "What is the capital of France?") -> dict[str, Any]:
    """A chat request whose prefix no other test sends (``tag`` leads the system prompt)."""
    return {
        "model": MODEL_NAME,
        "messages": [
            {"role": "system", "content": f"[{tag}] {SYSTEM}"},
            {"role": "user", "content": question},
        ],
        "max_tokens": 1,
        "temperature": 0,
    }


def post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(url + path, json=body, timeout=120)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def send_and_collect(
    url: str, path: str, body: dict[str, Any], feed: KvEventFeed, expected_blocks: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Send ``body``; return the response and the BlockStored events it caused."""
    feed.drain()
    answer = post(url, path, body)
    batches = feed.collect_until(lambda b: len(stored_hashes(b)) >= expected_blocks)
    return answer, stored_events(batches)


def stored_hashes_of(events: list[dict[str, Any]]) -> list[int]:
    return [h for e in events for h in e["block_hashes"]]


@pytest.mark.parametrize("salt", [None, "tenant-a"], ids=["unsalted", "salted"])
def test_chat_hashes_equal_block_stored_events(
    vllm_cluster: VllmCluster, kv_events: dict[str, KvEventFeed], exact: ExactHasher,
    salt: str | None,
) -> None:  # fmt: skip
    """A chat request's hashes, computed by the router, are the ones vLLM publishes."""
    worker = vllm_cluster.workers[0]
    body = chat_body(f"chat-{salt}")
    if salt is not None:
        body["cache_salt"] = salt
    expected = exact.request_chain("chat", body, cache_salt=salt)
    tokens = exact.prompts.prompt_tokens("chat", body)
    assert len(expected.chain) >= 3

    answer, events = send_and_collect(
        worker.url, "/v1/chat/completions", body, kv_events[worker.worker_id], len(expected.chain)
    )

    assert answer["usage"]["prompt_tokens"] == expected.prompt_tokens == len(tokens)
    stored_tokens = [t for e in events for t in e["token_ids"]]
    full = len(expected.chain) * vllm_cluster.block_size
    assert stored_tokens[:full] == tokens[:full]
    assert stored_hashes_of(events)[: len(expected.chain)] == list(expected.chain)
    assert events[0]["parent_block_hash"] is None
    assert events[0]["extra_keys"][0] == ([salt] if salt else None)


@pytest.mark.parametrize("form", ["text", "token_ids"])
def test_completion_hashes_equal_block_stored_events(
    vllm_cluster: VllmCluster, kv_events: dict[str, KvEventFeed], exact: ExactHasher, form: str
) -> None:
    """A completions request (text, which gets BOS, or token ids) hashes as vLLM's does."""
    worker = vllm_cluster.workers[0]
    text = f"[completion-{form}] {SYSTEM} Once upon a time, a small model answered."
    prompt: str | list[int] = text
    if form == "token_ids":
        prompt = exact.prompts.encode(text, add_special_tokens=False)
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1, "cache_salt": "tenant-c"}
    expected = exact.request_chain("completions", body, cache_salt="tenant-c")
    assert len(expected.chain) >= 3

    answer, events = send_and_collect(
        worker.url, "/v1/completions", body, kv_events[worker.worker_id], len(expected.chain)
    )

    assert answer["usage"]["prompt_tokens"] == expected.prompt_tokens
    assert stored_hashes_of(events)[: len(expected.chain)] == list(expected.chain)


def test_both_workers_publish_the_same_hashes(
    vllm_cluster: VllmCluster, kv_events: dict[str, KvEventFeed], exact: ExactHasher
) -> None:
    """Two vLLM processes with the same hash seed publish identical hashes for one prompt."""
    body = chat_body("two-workers")
    expected = list(exact.request_chain("chat", body, cache_salt=None).chain)
    published = []
    for worker in vllm_cluster.workers:
        _, events = send_and_collect(
            worker.url, "/v1/chat/completions", body, kv_events[worker.worker_id], len(expected)
        )
        published.append(stored_hashes_of(events)[: len(expected)])
    assert published == [expected, expected]


def test_prefix_reuse_is_per_worker_and_per_salt(vllm_cluster: VllmCluster) -> None:
    """A repeated prefix is served from cache on the same worker and salt, nowhere else."""
    first, second = vllm_cluster.workers
    block = vllm_cluster.block_size

    def cached(url: str, salt: str, question: str) -> tuple[int, int]:
        body = chat_body("reuse", question) | {"cache_salt": salt}
        usage = post(url, "/v1/chat/completions", body)["usage"]
        return usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]

    prompt, cold = cached(first.url, "tenant-x", "What is a cache?")
    assert cold == 0
    # Same leading messages, new question: the shared full blocks come from the cache.
    prompt2, warm = cached(first.url, "tenant-x", "What is a router?")
    assert warm > 0
    assert warm % block == 0
    assert warm <= min(prompt, prompt2) - 1
    # Identical text under another tenant's salt, or on another worker: nothing cached.
    assert cached(first.url, "tenant-y", "What is a router?")[1] == 0
    assert cached(second.url, "tenant-x", "What is a router?")[1] == 0


RENDER_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("chat-plain", "chat", {"messages": [{"role": "user", "content": "Hello there"}]}),
    (
        "chat-parts-and-names",
        "chat",
        {
            "messages": [
                {
                    "role": "system",
                    "content": [
                        {"type": "text", "text": "Be brief."},
                        {"type": "text", "text": "Be kind."},
                    ],
                },
                {"role": "user", "name": "ada", "content": "Hi"},
            ]
        },
    ),  # fmt: skip
    (
        "chat-tools-and-calls",
        "chat",
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
            ],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "weather",
                        "description": "Current weather",
                        "parameters": {
                            "type": "object",
                            "properties": {"city": {"type": "string"}},
                        },
                    },
                },
                {"type": "function", "function": {"name": "noop", "strict": True}},
            ],
            # vLLM renders tools without a tool parser only when none is to be called.
            "tool_choice": "none",
        },
    ),
    (
        "chat-developer-role",
        "chat",
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "developer", "content": "Dev"}]},
    ),
    (
        "chat-continue-final",
        "chat",
        {
            "messages": [
                {"role": "user", "content": "Count to three"},
                {"role": "assistant", "content": "One, two"},
            ],
            "add_generation_prompt": False,
            "continue_final_message": True,
        },
    ),
    (
        "chat-special-tokens",
        "chat",
        {"messages": [{"role": "user", "content": "x"}], "add_special_tokens": True},
    ),  # fmt: skip
    ("completion-text", "completions", {"prompt": "Grüße! ¿Qué tal? 3.14159"}),
    ("completion-no-bos", "completions", {"prompt": "Hello", "add_special_tokens": False}),
    ("completion-ids", "completions", {"prompt": [5, 6, 7, 8]}),
]


@pytest.mark.parametrize(("endpoint", "body"), [c[1:] for c in RENDER_CASES],
                         ids=[c[0] for c in RENDER_CASES])  # fmt: skip
def test_router_tokens_equal_vllms_renderer(
    vllm_cluster: VllmCluster, exact: ExactHasher, endpoint: str, body: dict[str, Any]
) -> None:
    """For each request shape, the router tokenizes exactly as vLLM's OpenAI server does."""
    body = {"model": MODEL_NAME, **body}
    path = "/v1/chat/completions/render" if endpoint == "chat" else "/v1/completions/render"
    rendered = post(vllm_cluster.workers[1].url, path, body)
    vllm_tokens = rendered["token_ids"] if endpoint == "chat" else rendered[0]["token_ids"]
    assert exact.prompts.prompt_tokens(endpoint, body) == vllm_tokens  # type: ignore[arg-type]


def test_vllm_reference_hashes_equal_ours(vllm_env: VllmEnv) -> None:
    """vLLM's own hashing code and ours agree on random prompts, algorithms, seeds, salts."""
    rng = random.Random(2024)
    cases = []
    for index in range(24):
        cases.append(
            {
                "algo": ("sha256", "sha256_cbor")[index % 2],
                "seed": (None, "0", "4294967295")[index % 3],
                "block_size": (16, 32)[index // 12],
                "tokens": [rng.randrange(0, 300_000) for _ in range(rng.randrange(0, 100))],
                "cache_salt": (None, "", "tenant-ü", "s")[index % 4],
                "lora": ["adapter", f"/adapters/{index}"] if index % 5 == 0 else None,
            }
        )
    done = subprocess.run(
        [str(vllm_env.python), str(REFERENCE_SCRIPT)],
        input=json.dumps(cases), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for case, reference in zip(cases, json.loads(done.stdout), strict=True):
        hasher = VllmBlockHasher(case["block_size"], case["algo"], case["seed"] or DEFAULT_SEED)
        lora = tuple(case["lora"]) if case["lora"] else None
        assert hasher.root.hex() == reference["none_hash"]
        ours = hasher.chain_for(case["tokens"], cache_salt=case["cache_salt"], lora=lora)  # type: ignore[arg-type]
        assert list(ours) == reference["event_hashes"], case


def test_each_worker_fits_in_memory(vllm_cluster: VllmCluster, record_property: Any) -> None:
    """A tiny-model CPU worker (API server, engine core, model runner) stays under 3 GiB."""
    for worker in vllm_cluster.workers:
        rss = worker.rss_bytes()
        record_property(f"{worker.worker_id}_rss_mib", rss >> 20)
        print(f"{worker.worker_id}: {rss >> 20} MiB resident", flush=True)
        assert 0 < rss < 3 << 30
    record_property("startup_seconds", round(vllm_cluster.startup_seconds, 1))
