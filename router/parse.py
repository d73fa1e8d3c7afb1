"""Request bodies in, validated; forwarded bodies out, with the tenant's salt set.

Only what routing needs is checked here (the worker validates the rest and its 400 is passed
through): the body is a JSON object; ``model`` is a string; ``messages`` (chat) is a non-empty
list of objects with a string ``role``; ``prompt`` (completions) is a string, token ids, or a
non-empty list of either; ``stream`` is a boolean; ``stream_options`` an object; ``max_tokens``
a non-negative integer; ``prompt_cache_key`` a string. Every failure is a `BadRequest` naming
the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from router.errors import BadRequest

Endpoint = Literal["chat", "completions"]

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    endpoint: Endpoint
    body: dict[str, Any]
    model: str
    stream: bool
    client_wants_usage: bool
    """The client itself asked for the streamed usage chunk."""
    prompt_cache_key: str | None
    raw: bytes = b""
    """The body as the client sent it (decompressed): what `forward_body` splices into."""


def decode_body(raw: bytes) -> dict[str, Any]:
    try:
        body = _decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def parse_request(endpoint: Endpoint, raw: bytes) -> ParsedRequest:
    body = decode_body(raw)
    model = body.get("model", "")
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string", param="model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    wants_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object", param="stream_options")
        include = options.get("include_usage", False)
        if include is not None and not isinstance(include, bool):
            raise BadRequest(
                "'stream_options.include_usage' must be a boolean",
                param="stream_options.include_usage",
            )
        wants_usage = bool(include)
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise BadRequest(f"'{name}' must be an integer", param=name)
        if isinstance(value, int) and value < 0:
            raise BadRequest(f"'{name}' must be >= 0, got {value}", param=name)
    cache_key = body.get("prompt_cache_key")
    if cache_key is not None and not isinstance(cache_key, str):
        raise BadRequest("'prompt_cache_key' must be a string", param="prompt_cache_key")
    if endpoint == "chat":
        _check_messages(body)
    else:
        _check_prompt(body)
    return ParsedRequest(endpoint, body, model, stream, wants_usage, cache_key or None, raw)


def _check_messages(body: dict[str, Any]) -> None:
    if "messages" not in body:
        raise BadRequest("'messages' is required", param="messages")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"'messages[{i}]' must be an object", param=f"messages[{i}]")
        if not isinstance(message.get("role"), str):
            raise BadRequest(f"'messages[{i}].role' must be a string", param=f"messages[{i}].role")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise BadRequest(
                f"'messages[{i}].content' must be a string or an array of parts",
                param=f"messages[{i}].content",
            )
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRequest("'tools' must be an array", param="tools")


def _is_token_ids(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    )


def _check_prompt(body: dict[str, Any]) -> None:
    if "prompt" not in body:
        raise BadRequest("'prompt' is required", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        if _is_token_ids(prompt):
            return
        if all(isinstance(p, str) for p in prompt):
            return
        if all(_is_token_ids(p) and p for p in prompt):
            return
    raise BadRequest(
        "'prompt' must be a string, an array of token ids, or a non-empty array of either",
        param="prompt",
    )


def forward_body(parsed: ParsedRequest, cache_salt: str) -> bytes:
    """The body sent to the worker: the client's, with our ``cache_salt`` (overwriting any
    value the client sent) and, for streams, ``include_usage`` on so the router sees usage.

    The common case (no client ``cache_salt``; no ``stream_options`` to merge into) splices
    the new members into the client's bytes instead of encoding the whole body again, so
    every other field reaches the worker byte for byte; the rest re-encode the parsed body.
    ``parsed.body`` gets the same members either way."""
    body = parsed.body
    add_usage = parsed.stream and not parsed.client_wants_usage
    splice = (
        bool(body) and "cache_salt" not in body and not (add_usage and "stream_options" in body)
    )
    body["cache_salt"] = cache_salt
    if add_usage:
        options = body.get("stream_options")
        body["stream_options"] = {**(options or {}), "include_usage": True}
    if splice:
        members = b'"cache_salt":' + _encoder.encode(cache_salt)
        if add_usage:
            members += b',"stream_options":{"include_usage":true}'
        spliced = splice_members(parsed.raw, members)
        if spliced is not None:
            return spliced
    return _encoder.encode(body)


_JSON_SPACE = b" \t\n\r"


def splice_members(raw: bytes, members: bytes) -> bytes | None:
    """``raw`` (a non-empty JSON object) with ``members`` (encoded ``"key":value`` pairs whose
    keys ``raw`` lacks) inserted first; None when ``raw`` does not open with ``{``."""
    start = len(raw) - len(raw.lstrip(_JSON_SPACE))
    if raw[start : start + 1] != b"{":
        return None
    return b"".join((raw[: start + 1], members, b",", raw[start + 1 :]))


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


def decode(raw: bytes) -> Any:
    return _decoder.decode(raw)
