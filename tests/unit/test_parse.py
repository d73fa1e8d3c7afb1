"""Request validation (every failure is a 400 naming the field) and the forwarded body."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router.errors import BadRequest
from router.parse import Endpoint, decode_body, forward_body, parse_request

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION: dict[str, Any] = {"model": "m", "prompt": "Once upon a time"}


def _raw(body: Any) -> bytes:
    return json.dumps(body).encode()


def _with(base: dict[str, Any], **fields: Any) -> bytes:
    return _raw({**base, **fields})


def _bad(endpoint: Endpoint, raw: bytes) -> BadRequest:
    with pytest.raises(BadRequest) as excinfo:
        parse_request(endpoint, raw)
    assert excinfo.value.status == 400
    assert excinfo.value.type == "invalid_request_error"
    return excinfo.value


def test_valid_chat_request_is_parsed() -> None:
    """A well-formed chat request yields its model, stream flag and cache key."""
    parsed = parse_request(
        "chat",
        _with(CHAT, stream=True, prompt_cache_key="conv-1", stream_options={"include_usage": True}),
    )
    assert parsed.endpoint == "chat"
    assert parsed.model == "m"
    assert parsed.stream is True
    assert parsed.client_wants_usage is True
    assert parsed.prompt_cache_key == "conv-1"


def test_optional_fields_default_sensibly() -> None:
    """No model, stream null and an empty prompt_cache_key mean: no model, no stream, no key."""
    parsed = parse_request(
        "completions", _raw({"prompt": "x", "stream": None, "prompt_cache_key": ""})
    )
    assert parsed.model == ""
    assert parsed.stream is False
    assert parsed.client_wants_usage is False
    assert parsed.prompt_cache_key is None


@pytest.mark.parametrize(
    "prompt",
    ["text", "", [1, 2, 3], ["a", "b"], [[1, 2], [3]], [0]],
)
def test_every_documented_prompt_form_is_accepted(prompt: Any) -> None:
    """A prompt may be a string, token ids, or a non-empty list of either."""
    assert parse_request("completions", _with(COMPLETION, prompt=prompt)).endpoint == "completions"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**CHAT, "model": 7}, "model"),
        ({**CHAT, "stream": "yes"}, "stream"),
        ({**CHAT, "stream": 1}, "stream"),
        ({**CHAT, "stream_options": "usage"}, "stream_options"),
        ({**CHAT, "stream_options": {"include_usage": "true"}}, "stream_options.include_usage"),
        ({**CHAT, "max_tokens": "16"}, "max_tokens"),
        ({**CHAT, "max_tokens": 1.5}, "max_tokens"),
        ({**CHAT, "max_tokens": True}, "max_tokens"),
        ({**CHAT, "max_tokens": -1}, "max_tokens"),
        ({**CHAT, "max_completion_tokens": "x"}, "max_completion_tokens"),
        ({**CHAT, "max_completion_tokens": -5}, "max_completion_tokens"),
        ({**CHAT, "prompt_cache_key": 12}, "prompt_cache_key"),
        ({"model": "m"}, "messages"),
        ({**CHAT, "messages": []}, "messages"),
        ({**CHAT, "messages": {"role": "user"}}, "messages"),
        ({**CHAT, "messages": ["hi"]}, "messages[0]"),
        ({**CHAT, "messages": [{"content": "hi"}]}, "messages[0].role"),
        ({**CHAT, "messages": [{"role": "user", "content": "a"}, {"role": 3}]}, "messages[1].role"),
        ({**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({**CHAT, "messages": [{"role": "user", "content": {"t": 1}}]}, "messages[0].content"),
        ({**CHAT, "tools": {"name": "f"}}, "tools"),
    ],
)
def test_chat_field_errors_name_the_field(body: dict[str, Any], param: str) -> None:
    """Each wrong type or missing field in a chat request is a 400 whose param names it."""
    error = _bad("chat", _raw(body))
    assert error.param == param
    assert param.split("[")[0].split(".")[0] in error.message


@pytest.mark.parametrize(
    "prompt",
    [None, 5, [], [[]], [1, "a"], [-1], [True], [1.5], [["a"]], [[1], "a"], {"text": "x"}],
)
def test_bad_prompt_is_rejected_naming_prompt(prompt: Any) -> None:
    """A prompt that is not a string, token ids, or a non-empty list of either is a 400."""
    assert _bad("completions", _with(COMPLETION, prompt=prompt)).param == "prompt"


def test_missing_prompt_is_rejected() -> None:
    """A completion request without a prompt is a 400 on 'prompt'."""
    error = _bad("completions", _raw({"model": "m"}))
    assert error.param == "prompt"
    assert "required" in error.message


def test_completion_checks_shared_fields_too() -> None:
    """Fields common to both endpoints are checked on completions as well."""
    assert _bad("completions", _with(COMPLETION, stream="no")).param == "stream"
    assert _bad("completions", _with(COMPLETION, max_tokens=-2)).param == "max_tokens"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"{'model': 'm'}", "not valid JSON"),
        (b'{"model": "\xff\xfe"}', "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b'{"a": NaN}', "not valid JSON"),
        (b'{"a": 1e999}', "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b'"hello"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"42", "must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
    ],
)
def test_undecodable_bodies_are_bad_requests(raw: bytes, message: str) -> None:
    """Broken JSON, invalid UTF-8, non-objects and absurd nesting are 400s, never 500s."""
    endpoints: tuple[Endpoint, ...] = ("chat", "completions")
    for endpoint in endpoints:
        error = _bad(endpoint, raw)
        assert message in error.message
        assert error.param is None


def test_decode_body_returns_the_object() -> None:
    """A JSON object body decodes to the same dict."""
    assert decode_body(b'{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}


def _forwarded(endpoint: Endpoint, body: dict[str, Any], salt: str = "SALT") -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(forward_body(parse_request(endpoint, _raw(body)), salt))
    return decoded


def test_forward_body_overwrites_client_cache_salt() -> None:
    """A client-sent cache_salt is replaced by the tenant's, so no tenant can borrow another's."""
    body = {**CHAT, "cache_salt": "someone-elses-salt"}
    assert _forwarded("chat", body, salt="ours")["cache_salt"] == "ours"
    assert _forwarded("completions", {**COMPLETION, "cache_salt": 5}, salt="ours")[
        "cache_salt"
    ] == ("ours")
    assert _forwarded("chat", CHAT, salt="ours")["cache_salt"] == "ours"


def test_forward_body_preserves_every_other_field() -> None:
    """Everything the client sent reaches the worker unchanged, apart from cache_salt."""
    body = {
        **CHAT,
        "messages": [
            {"role": "system", "content": "Ünïcödé ✓ \u2028"},
            {"role": "user", "content": [{"type": "text", "text": "x"}]},
        ],
        "temperature": 0.7,
        "max_tokens": 12,
        "n": 2,
        "logit_bias": {"50256": -100},
        "seed": 123456789012345678901234567890,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "stop": None,
        "vendor_extension": {"nested": [1, 2.5, False]},
    }
    forwarded = _forwarded("chat", body)
    assert forwarded.pop("cache_salt") == "SALT"
    assert forwarded == body


def test_stream_without_usage_gets_include_usage_added() -> None:
    """For a stream whose client did not ask for usage, the router asks for it (keeping options)."""
    forwarded = _forwarded("chat", {**CHAT, "stream": True})
    assert forwarded["stream_options"] == {"include_usage": True}
    forwarded = _forwarded(
        "completions",
        {**COMPLETION, "stream": True, "stream_options": {"continuous_usage_stats": False}},
    )
    assert forwarded["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    forwarded = _forwarded(
        "chat", {**CHAT, "stream": True, "stream_options": {"include_usage": False}}
    )
    assert forwarded["stream_options"] == {"include_usage": True}


def test_stream_whose_client_asked_for_usage_is_left_alone() -> None:
    """When the client already asked for usage, its stream_options pass through as sent."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    forwarded = _forwarded("chat", {**CHAT, "stream": True, "stream_options": options})
    assert forwarded["stream_options"] == options


def test_non_stream_request_gets_no_stream_options() -> None:
    """A non-streaming request is not given stream_options (vLLM would reject them)."""
    assert "stream_options" not in _forwarded("chat", CHAT)
    assert "stream_options" not in _forwarded("completions", {**COMPLETION, "stream": False})


def test_parsed_client_wants_usage_survives_forwarding() -> None:
    """After forwarding, the parsed request still says the client did not ask for usage."""
    parsed = parse_request("chat", _with(CHAT, stream=True))
    forward_body(parsed, "SALT")
    assert parsed.client_wants_usage is False
