"""The simulator's endpoints for peer routers: sglang server/model info, vLLM tokenize/render."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from worker.sim import SimConfig, create_app
from worker.sim.tokenizer import TAIL_BASE, encode, render_chat

SYSTEM = "You are a careful assistant. Keep answers short and exact. " * 30  # ~450 tokens
MAX_MODEL_LEN = 8192


def chat(user: str = "What is the capital of France?", **extra: Any) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        **extra,
    }


@pytest.fixture
async def client() -> AsyncIterator[TestClient[Any, Any]]:
    config = SimConfig(worker_id="w-peer", max_model_len=MAX_MODEL_LEN, decode_ms_per_token=0.1)
    async with TestClient(TestServer(create_app(config), host="127.0.0.1")) as http:
        yield http


async def post(client: TestClient[Any, Any], path: str, body: Any, status: int = 200) -> Any:
    response = await client.post(path, json=body)
    assert response.status == status, await response.text()
    return await response.json()


@pytest.mark.parametrize("path", ["/server_info", "/get_server_info"])
async def test_server_info_names_the_model_without_a_model_path(
    client: TestClient[Any, Any], path: str
) -> None:
    """sglang-router learns the served name and sizes, but gets no path to fetch a tokenizer."""
    response = await client.get(path)
    assert response.status == 200
    info = await response.json()
    assert info["served_model_name"] == "sim-model"
    assert info["dp_size"] == 1
    assert info["context_length"] == MAX_MODEL_LEN
    assert "model_path" not in info
    assert "tokenizer_path" not in info
    assert response.headers["x-worker-id"] == "w-peer"


@pytest.mark.parametrize("path", ["/model_info", "/get_model_info"])
async def test_model_info_says_generation_without_a_tokenizer_path(
    client: TestClient[Any, Any], path: str
) -> None:
    """The model info marks a generative model and names no model or tokenizer path."""
    response = await client.get(path)
    info = await response.json()
    assert info["is_generation"] is True
    assert info["architectures"]
    assert "model_path" not in info
    assert "tokenizer_path" not in info


async def test_tokenize_chat_counts_what_inference_reports(client: TestClient[Any, Any]) -> None:
    """/tokenize's ids for a chat are the simulator's, and as many as the completion's usage."""
    body = chat("Four bytes!")  # the rendered chat is a whole number of 4-byte pieces
    tokens = await post(client, "/tokenize", body)
    expected = encode(render_chat(body["messages"]))
    assert tokens["tokens"] == expected
    assert tokens["count"] == len(expected)
    assert tokens["max_model_len"] == MAX_MODEL_LEN
    assert tokens["token_strs"] is None
    completion = await post(client, "/v1/chat/completions", {**body, "max_tokens": 2})
    assert completion["usage"]["prompt_tokens"] == tokens["count"]


async def test_tokenize_text_prompt_with_token_strings(client: TestClient[Any, Any]) -> None:
    """A text prompt tokenizes into 4-byte pieces, with their strings on request."""
    tokens = await post(
        client, "/tokenize", {"model": "sim-model", "prompt": "abcdefgh", "return_token_strs": True}
    )
    assert tokens["tokens"] == encode("abcdefgh")
    assert tokens["token_strs"] == ["abcd", "efgh"]


async def test_a_final_partial_piece_is_shown_as_a_32_bit_id(client: TestClient[Any, Any]) -> None:
    """A prompt ending mid-piece keeps its count; its last id is the zero-padded 32-bit piece."""
    tokens = await post(client, "/tokenize", {"prompt": "abcdefg"})
    assert encode("abcdefg")[-1] >= TAIL_BASE
    assert tokens["tokens"] == [encode("abcd")[0], int.from_bytes(b"efg\0", "little")]
    assert all(0 <= t < 2**32 for t in tokens["tokens"])


async def test_render_chat_gives_the_prompt_ids_and_sampling_params(
    client: TestClient[Any, Any],
) -> None:
    """Chat render answers vLLM's GenerateRequest: same ids as /tokenize, request's settings."""
    body = chat(max_tokens=7, stream=True, stream_options={"include_usage": True}, cache_salt="s1")
    response = await client.post(
        "/v1/chat/completions/render", json=body, headers={"x-request-id": "r-42"}
    )
    assert response.status == 200
    rendered = await response.json()
    tokens = await post(client, "/tokenize", chat())
    assert rendered["token_ids"] == tokens["tokens"]
    assert rendered["request_id"] == "chatcmpl-r-42"
    assert rendered["sampling_params"]["max_tokens"] == 7
    assert rendered["stream"] is True
    assert rendered["stream_options"] == {"include_usage": True}
    assert rendered["cache_salt"] == "s1"
    assert rendered["model"] == "sim-model"


async def test_render_completions_gives_one_request_per_prompt(
    client: TestClient[Any, Any],
) -> None:
    """Completions render answers a list with one GenerateRequest for the prompt."""
    rendered = await post(
        client, "/v1/completions/render", {"model": "sim-model", "prompt": "abcdefgh"}
    )
    assert isinstance(rendered, list)
    assert len(rendered) == 1
    assert rendered[0]["token_ids"] == encode("abcdefgh")
    assert rendered[0]["request_id"].startswith("cmpl-")
    assert rendered[0]["sampling_params"]["max_tokens"] == 16


async def test_render_and_tokenize_leave_cache_and_request_log_alone(
    client: TestClient[Any, Any],
) -> None:
    """Peers' tokenize and render calls neither fill the cache nor count as requests."""
    await post(client, "/v1/chat/completions/render", chat())
    await post(client, "/tokenize", chat())
    state = await (await client.get("/sim/state")).json()
    assert state["requests_total"] == 0
    assert state["cached_blocks"] == 0
    log = await (await client.get("/sim/requests")).json()
    assert log["requests"] == []


async def test_errors_follow_vllm(client: TestClient[Any, Any]) -> None:
    """Unknown model is 404; bad messages, bad prompt and contradictory flags are 400."""
    missing = await post(client, "/tokenize", {"model": "other", "prompt": "x"}, status=404)
    assert missing["error"]["type"] == "NotFoundError"
    await post(client, "/tokenize", {"messages": "not a list"}, status=400)
    await post(client, "/tokenize", {"prompt": [1, 2]}, status=400)
    both = {**chat(), "add_generation_prompt": True, "continue_final_message": True}
    await post(client, "/tokenize", both, status=400)
    await post(client, "/v1/chat/completions/render", {"model": "sim-model"}, status=400)
    too_long = chat("x" * (4 * MAX_MODEL_LEN))
    await post(client, "/v1/chat/completions/render", too_long, status=400)


async def test_detokenize_inverts_tokenize(client: TestClient[Any, Any]) -> None:
    """/detokenize gives back the text of /tokenize's ids."""
    tokens = await post(client, "/tokenize", {"prompt": "hello world!"})
    text = await post(client, "/detokenize", {"tokens": tokens["tokens"]})
    assert text == {"prompt": "hello world!"}
    await post(client, "/detokenize", {"tokens": [-1]}, status=400)
