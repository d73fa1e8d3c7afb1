"""Request validation and response shapes follow vLLM's OpenAI server."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from worker.sim.faults import FaultInjector, parse_fault
from worker.sim.protocol import ApiError, Kind, ParsedRequest, decode_body, parse_request
from worker.sim.responses import StreamEncoder, chat_completion, usage_fields
from worker.sim.tokenizer import encode

MODEL = "sim-model"


def parse(kind: Kind, body: dict[str, Any], max_model_len: int = 1000) -> ParsedRequest:
    return parse_request(kind, body, served_model=MODEL, max_model_len=max_model_len)


def error_of(kind: Kind, body: dict[str, Any], max_model_len: int = 1000) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse(kind, body, max_model_len)
    return caught.value


CHAT = {"messages": [{"role": "user", "content": "hello"}]}


def test_defaults_match_vllm() -> None:
    """No max_tokens means 16; no stream_options means no usage chunk; model may be omitted."""
    parsed = parse("chat", CHAT)
    assert parsed.max_tokens == 16
    assert not parsed.stream
    assert not parsed.include_usage
    assert parsed.cache_salt is None


def test_max_completion_tokens_wins_for_chat() -> None:
    """Chat honours max_completion_tokens over max_tokens."""
    parsed = parse("chat", {**CHAT, "max_tokens": 5, "max_completion_tokens": 7})
    assert parsed.max_tokens == 7


def test_stream_options_default_to_including_usage() -> None:
    """An empty stream_options object turns usage on, as vLLM's StreamOptions does."""
    assert parse("chat", {**CHAT, "stream": True, "stream_options": {}}).include_usage
    off = parse("chat", {**CHAT, "stream": True, "stream_options": {"include_usage": False}})
    assert not off.include_usage


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("abcdefgh", encode("abcdefgh")),
        (["abcdefgh"], encode("abcdefgh")),
        ([5, 6, 7], [5, 6, 7]),
        ([[5, 6, 7]], [5, 6, 7]),
    ],
)
def test_completion_prompts_accept_text_and_token_ids(prompt: Any, expected: list[int]) -> None:
    """A string, token ids, or a one-element list of either is one prompt."""
    assert parse("completion", {"prompt": prompt}).prompt_ids == expected


@pytest.mark.parametrize(
    ("kind", "body", "status", "err_type"),
    [
        ("chat", {"model": "other", **CHAT}, 404, "NotFoundError"),
        ("chat", {}, 400, "Bad Request"),
        ("chat", {"messages": []}, 400, "BadRequestError"),
        ("chat", {"messages": [{"content": "no role"}]}, 400, "Bad Request"),
        ("chat", {**CHAT, "max_tokens": 0}, 400, "BadRequestError"),
        ("chat", {**CHAT, "max_tokens": "10"}, 400, "Bad Request"),
        ("chat", {**CHAT, "n": 2}, 400, "BadRequestError"),
        ("chat", {**CHAT, "cache_salt": ""}, 400, "BadRequestError"),
        ("chat", {**CHAT, "stream_options": {"include_usage": True}}, 400, "BadRequestError"),
        ("chat", {**CHAT, "stream": "yes"}, 400, "Bad Request"),
        ("completion", {"prompt": ""}, 400, "BadRequestError"),
        ("completion", {"prompt": ["a", "b"]}, 400, "BadRequestError"),
        ("completion", {"prompt": {"x": 1}}, 400, "Bad Request"),
        ("completion", {"prompt": [1, -2]}, 400, "Bad Request"),
    ],
)
def test_invalid_requests_are_rejected_with_vllm_status_and_type(
    kind: Kind, body: dict[str, Any], status: int, err_type: str
) -> None:
    """Each malformed body gets vLLM's status code and error type."""
    err = error_of(kind, body)
    assert (err.status, err.err_type) == (status, err_type)
    shape = msgspec.json.decode(err.body())
    assert set(shape) == {"error"}
    assert shape["error"] == {
        "message": err.message,
        "type": err_type,
        "param": err.param,
        "code": status,
    }


def test_prompt_longer_than_the_context_is_a_400() -> None:
    """Prompt plus max_tokens beyond max_model_len is rejected with the context message."""
    err = error_of("completion", {"prompt": [1] * 90, "max_tokens": 20}, max_model_len=100)
    assert err.status == 400
    assert "maximum context length is 100 tokens" in err.message
    err = error_of("completion", {"prompt": [1] * 100, "max_tokens": 1}, max_model_len=100)
    assert err.status == 400


def test_body_must_be_a_json_object() -> None:
    """Invalid JSON and non-object JSON are 400s."""
    for raw in (b"{", b"[1, 2]", b""):
        with pytest.raises(ApiError) as caught:
            decode_body(raw)
        assert caught.value.status == 400


def test_usage_reports_cached_tokens_or_null_details() -> None:
    """usage carries prompt_tokens_details.cached_tokens, or null when details are off."""
    assert usage_fields(10, 3, 4) == {
        "prompt_tokens": 10,
        "total_tokens": 13,
        "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    assert usage_fields(10, 3, None)["prompt_tokens_details"] is None


def test_chat_completion_body_has_vllm_fields() -> None:
    """The non-streamed chat object has vLLM's top-level and choice fields."""
    body = msgspec.json.decode(chat_completion("chatcmpl-1", 1, MODEL, "hi", usage_fields(1, 1, 0)))
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] == "length"
    assert {"usage", "prompt_logprobs", "kv_transfer_params", "system_fingerprint"} <= set(body)


def decode_event(event: bytes) -> dict[str, Any]:
    assert event.startswith(b"data: ")
    assert event.endswith(b"\n\n")
    result: dict[str, Any] = msgspec.json.decode(event[6:-2])
    return result


def test_stream_chunks_have_vllm_shapes() -> None:
    """Chat chunks: role first, no usage key; last token carries finish_reason and stop_reason."""
    enc = StreamEncoder("chat", "chatcmpl-1", 5, MODEL, 10, continuous_usage=False)
    role = decode_event(enc.role_chunk())
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in role
    mid = decode_event(enc.token_chunk('ab"c', 1, last=False))
    assert mid["choices"] == [
        {"index": 0, "delta": {"content": 'ab"c'}, "logprobs": None, "finish_reason": None}
    ]
    last = decode_event(enc.token_chunk("x", 2, last=True))
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["choices"][0]["stop_reason"] is None
    usage = decode_event(enc.usage_chunk(2, 4))
    assert usage["choices"] == []
    assert usage["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}
    assert "prompt_tokens_details" not in decode_event(enc.usage_chunk(2, None))["usage"]


def test_completion_stream_chunks_carry_null_usage() -> None:
    """Completion chunks are dumped without exclude_unset, so they show usage: null."""
    enc = StreamEncoder("completion", "cmpl-1", 5, MODEL, 10, continuous_usage=False)
    chunk = decode_event(enc.token_chunk("abcd", 1, last=False))
    assert chunk["object"] == "text_completion"
    assert chunk["usage"] is None
    assert chunk["choices"][0]["text"] == "abcd"
    cont = StreamEncoder("completion", "cmpl-1", 5, MODEL, 10, continuous_usage=True)
    assert decode_event(cont.token_chunk("a", 3, last=False))["usage"]["total_tokens"] == 13


def test_fault_settings_are_validated_and_count_down() -> None:
    """A fault with count 2 hits exactly the next two requests; bad settings are refused."""
    injector = FaultInjector()
    injector.set(parse_fault({"mode": "error", "status": 503, "count": 2}))
    assert [injector.take().mode for _ in range(3)] == ["error", "error", "none"]
    injector.set(parse_fault({"mode": "slow", "delay_ms": 5}))
    assert all(injector.take().mode == "slow" for _ in range(5))
    injector.reset()
    assert injector.take().mode == "none"
    bad_settings: list[object] = [
        {"mode": "melt"},
        {"mode": "error", "status": 999},
        {"count": 0},
        [],
    ]
    for bad in bad_settings:
        with pytest.raises(ValueError):
            parse_fault(bad)
