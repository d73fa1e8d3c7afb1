"""Parsing and validation of OpenAI-style request bodies, with vLLM's error semantics.

What is checked, and how it fails (vLLM's status codes and ``error.type`` values):
- the body is a JSON object; fields have the right JSON types -> 400 ``Bad Request``
  (vLLM's request-validation handler);
- ``model``, if given, is the served name -> 404 ``NotFoundError``;
- ``messages`` (chat) is a non-empty list of objects with a string ``role``; ``prompt``
  (completions) is a non-empty string or token-id list, or a one-element list of those;
- ``max_tokens`` (and ``max_completion_tokens`` for chat, which wins) is >= 1, default 16;
- ``n`` is 1; ``cache_salt`` a non-empty string; ``stream_options`` only with ``stream``;
- prompt plus completion fit ``max_model_len`` -> 400 ``BadRequestError``.
Every other field (temperature, top_p, stop, seed, ...) is accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from worker.sim.tokenizer import encode, render_chat

Kind = Literal["chat", "completion"]

DEFAULT_MAX_TOKENS = 16
MAX_TOKEN_ID = (1 << 63) - 1


class ApiError(Exception):
    """An error answered as vLLM's ``{"error": {message, type, param, code}}`` body."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        err_type: str = "BadRequestError",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type
        self.param = param

    def body(self) -> bytes:
        return msgspec.json.encode(
            {
                "error": {
                    "message": self.message,
                    "type": self.err_type,
                    "param": self.param,
                    "code": self.status,
                }
            }
        )


def invalid(message: str, param: str | None = None) -> ApiError:
    """A request-validation failure (what FastAPI/pydantic reports as 400 in vLLM)."""
    return ApiError(message, status=400, err_type="Bad Request", param=param)


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A validated inference request, reduced to what the simulator acts on."""

    kind: Kind
    prompt_ids: list[int]
    max_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    cache_salt: str | None


def decode_body(raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw``, or a 400."""
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise invalid(f"JSON decode error: {exc}") from exc
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    return body


def _opt_bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"'{key}' must be a boolean.", key)
    return value


def _opt_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{key}' must be an integer.", key)
    return int(value)


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_TOKEN_ID for t in value
    )


def _completion_prompt(body: dict[str, Any]) -> list[int]:
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid("'prompt' is required.", "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        # A batch: the simulator serves exactly one prompt per request.
        if len(prompt) != 1:
            raise ApiError(
                "The simulator serves one prompt per request; send a batch as separate requests.",
                param="prompt",
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = encode(prompt)
    elif _is_token_list(prompt):
        ids = list(prompt)
    else:
        raise invalid(
            "'prompt' must be a string, a list of token ids, or a list of them.", "prompt"
        )
    if not ids:
        raise ApiError("Prompt cannot be empty.", param="prompt")
    return ids


def _chat_prompt(body: dict[str, Any]) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise invalid("'messages' is required and must be a list.", "messages")
    if not messages:
        raise ApiError("'messages' must contain at least one message.", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(f"messages[{index}] must be an object with a string 'role'.", "messages")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise invalid(f"messages[{index}].content must be a string or a list.", "messages")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise invalid("'tools' must be a list.", "tools")
    add_generation_prompt = _opt_bool(body, "add_generation_prompt", True)
    ids = encode(render_chat(messages, tools, add_generation_prompt=add_generation_prompt))
    if not ids:
        raise ApiError("The rendered chat is empty.", param="messages")
    return ids


def parse_request(
    kind: Kind, body: dict[str, Any], *, served_model: str, max_model_len: int
) -> ParsedRequest:
    """Validate ``body`` for the chat or completions endpoint; raises `ApiError`."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("'model' must be a string.", "model")
    if model is not None and model != served_model:
        raise ApiError(f"The model `{model}` does not exist.", status=404, err_type="NotFoundError")

    stream = _opt_bool(body, "stream", False)
    stream_options = body.get("stream_options")
    include_usage = continuous_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise invalid("'stream_options' must be an object.", "stream_options")
        if not stream:
            raise ApiError(
                "Stream options can only be defined when `stream=True`.", param="stream_options"
            )
        # vLLM's StreamOptions defaults include_usage to true once the object is present.
        include_usage = _opt_bool(stream_options, "include_usage", True)
        continuous_usage = include_usage and _opt_bool(
            stream_options, "continuous_usage_stats", False
        )

    n = _opt_int(body, "n")
    if n is not None and n != 1:
        raise ApiError("The simulator supports only n=1.", param="n")

    cache_salt = body.get("cache_salt")
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
        raise ApiError(
            "Parameter 'cache_salt' must be a non-empty string if provided.", param="cache_salt"
        )

    max_tokens = _opt_int(body, "max_tokens")
    if kind == "chat":
        max_completion_tokens = _opt_int(body, "max_completion_tokens")
        if max_completion_tokens is not None:
            max_tokens = max_completion_tokens
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if max_tokens < 1:
        raise ApiError(f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens")

    prompt_ids = _chat_prompt(body) if kind == "chat" else _completion_prompt(body)
    _check_length(len(prompt_ids), max_tokens, max_model_len)
    return ParsedRequest(
        kind=kind,
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        cache_salt=cache_salt,
    )


def _check_length(prompt_len: int, max_tokens: int, max_model_len: int) -> None:
    if prompt_len >= max_model_len:
        raise ApiError(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt has {prompt_len} tokens, which leaves no room for the completion. "
            "Please reduce the length of the prompt.",
            param="messages",
        )
    if prompt_len + max_tokens > max_model_len:
        raise ApiError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the messages or "
            "completion.",
            param="max_tokens",
        )
