"""Response bodies and SSE chunks in the shapes vLLM's OpenAI server produces.

Non-streaming bodies are vLLM's ``model_dump()`` of its response objects: every field
present, unset ones as null, ``usage.prompt_tokens_details`` = ``{"cached_tokens": k}``
(null when prompt-token details are off).

Streaming, chat (vLLM dumps chunks with ``exclude_unset``):
  1. ``{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
     "logprobs": null, "finish_reason": null}], ...}``;
  2. one chunk per generated token, ``"delta": {"content": TEXT}``; the last token's chunk
     carries ``"finish_reason": "length", "stop_reason": null`` (there is no separate empty
     finish chunk);
  3. if ``stream_options.include_usage``: ``{"choices": [], "usage": {...}}`` (dumped with
     ``exclude_none``, so no null fields);
  4. ``data: [DONE]``.
No intermediate chunk has a ``usage`` key unless ``continuous_usage_stats`` is on.
Streaming, completions: no role chunk; token chunks are ``{"index": 0, "text": TEXT,
"logprobs": null, "finish_reason": null, "stop_reason": null}`` and, because vLLM dumps
them without ``exclude_unset``, each chunk carries ``"usage": null``.
Chunks are assembled from pre-encoded byte pieces: per token the only work is encoding
its text.
"""

from __future__ import annotations

from typing import Any

import msgspec

from worker.sim.protocol import Kind

DONE = b"data: [DONE]\n\n"
FINISH_REASON = "length"

_enc = msgspec.json.encode


def usage_fields(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int | None
) -> dict[str, Any]:
    """vLLM's UsageInfo; ``cached_tokens`` None means prompt-token details are off."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": (
            None if cached_tokens is None else {"cached_tokens": cached_tokens}
        ),
    }


def chat_completion(
    request_id: str,
    created: int,
    model: str,
    text: str,
    usage: dict[str, Any],
) -> bytes:
    """A ``chat.completion`` object."""
    return _enc(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": text,
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "tool_calls": [],
                        "reasoning_content": None,
                    },
                    "logprobs": None,
                    "finish_reason": FINISH_REASON,
                    "stop_reason": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage,
            "prompt_logprobs": None,
            "kv_transfer_params": None,
        }
    )


def text_completion(
    request_id: str,
    created: int,
    model: str,
    text: str,
    usage: dict[str, Any],
) -> bytes:
    """A ``text_completion`` object."""
    return _enc(
        {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": FINISH_REASON,
                    "stop_reason": None,
                    "prompt_logprobs": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage,
            "kv_transfer_params": None,
        }
    )


class StreamEncoder:
    """Builds the SSE events of one streamed response."""

    def __init__(
        self,
        kind: Kind,
        request_id: str,
        created: int,
        model: str,
        prompt_tokens: int,
        *,
        continuous_usage: bool,
    ) -> None:
        self.kind = kind
        self._prompt_tokens = prompt_tokens
        self._continuous_usage = continuous_usage
        obj = b'"chat.completion.chunk"' if kind == "chat" else b'"text_completion"'
        self._head = (
            b'data: {"id":'
            + _enc(request_id)
            + b',"object":'
            + obj
            + b',"created":'
            + str(created).encode()
            + b',"model":'
            + _enc(model)
            + b',"choices":'
        )
        if kind == "chat":
            self._open = b'[{"index":0,"delta":{"content":'
            self._mid = b'},"logprobs":null,"finish_reason":'
        else:
            self._open = b'[{"index":0,"text":'
            self._mid = b',"logprobs":null,"finish_reason":'

    def role_chunk(self) -> bytes:
        """Chat's first event: the assistant role with empty content."""
        usage = self._usage_tail(0)
        return (
            self._head
            + b'[{"index":0,"delta":{"role":"assistant","content":""},'
            + b'"logprobs":null,"finish_reason":null}]'
            + usage
            + b"}\n\n"
        )

    def token_chunk(self, text: str, completion_tokens: int, *, last: bool) -> bytes:
        """The event for one generated token (``completion_tokens`` counts it)."""
        if last:
            finish = b'"' + FINISH_REASON.encode() + b'","stop_reason":null}]'
        elif self.kind == "chat":
            finish = b"null}]"
        else:
            finish = b'null,"stop_reason":null}]'
        return (
            self._head
            + self._open
            + _enc(text)
            + self._mid
            + finish
            + self._usage_tail(completion_tokens)
            + b"}\n\n"
        )

    def usage_chunk(self, completion_tokens: int, cached_tokens: int | None) -> bytes:
        """The final ``choices: []`` event with the request's usage (no null fields)."""
        usage = usage_fields(self._prompt_tokens, completion_tokens, cached_tokens)
        if usage["prompt_tokens_details"] is None:
            del usage["prompt_tokens_details"]
        return self._head + b'[],"usage":' + _enc(usage) + b"}\n\n"

    def _usage_tail(self, completion_tokens: int) -> bytes:
        if self._continuous_usage:
            usage: dict[str, Any] = {
                "prompt_tokens": self._prompt_tokens,
                "total_tokens": self._prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens,
            }
            if self.kind == "completion":
                usage["prompt_tokens_details"] = None
            return b',"usage":' + _enc(usage)
        return b',"usage":null' if self.kind == "completion" else b""


def error_event(body: bytes) -> bytes:
    """An in-stream error (vLLM sends the error object as a data event, then [DONE])."""
    return b"data: " + body + b"\n\n"
