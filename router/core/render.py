"""Render a parsed OpenAI request body into the text (or token ids) the hasher cuts into blocks.

The rendering is not a chat template; it only has to keep the property prefix caching
relies on: requests that share their leading messages render to strings that share their
leading characters, so their block chains share their leading hashes.

Chat format (a sequence of length-prefixed fields, so it is self-delimiting and injective):

- tool schemas first, as chat templates place them: ``"\\x1d" + field("T", canonical JSON)``;
- then one record per message, in order: ``"\\x1e"`` followed by the fields that are present,
  in this order: role ``r``, name ``n``, content ``c`` (text parts; non-text parts such as
  images become ``m`` fields holding a fixed-size digest), tool_calls ``t`` (canonical JSON),
  tool_call_id ``i``; anything that is not a message object becomes one ``o`` field.

``field(tag, value) = tag + str(len(value)) + ":" + value``. Because a record depends only on
its own message, a conversation extended by one message renders to the shorter one's string
plus one record. A string ``content`` and a list holding the same single text part render
alike (they are the same prompt to the model). Canonical JSON sorts keys, so clients that
serialize the same tools in a different key order still share a prefix.

Every function is total over parsed JSON: the HTTP layer validates first, but an odd shape
here must cost a cache hit, never a request.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import mmh3
import msgspec

BATCH_SEPARATOR = "\x1e"
"""Joins a batch of text prompts (``prompt: [str, ...]``) into one string to hash. The batch
is routed as one request, so its first prompt's head drives affinity."""

_RECORD = "\x1e"
_TOOLS = "\x1d"

_SORTED_JSON = msgspec.json.Encoder(order="sorted")
"""Stateless encoder; about 10x faster than ``json.dumps(sort_keys=True)`` on tool schemas,
which every request of a tool-using tenant carries."""


def _canonical(value: Any) -> str:
    """Deterministic JSON (sorted keys) for hashing; never raises."""
    try:
        return _SORTED_JSON.encode(value).decode("utf-8")
    except (TypeError, ValueError, RecursionError):
        pass
    # Only reachable for values msgspec will not take: lone surrogates (valid in parsed JSON),
    # and values that are not parsed JSON at all (mixed-type keys, arbitrary objects).
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        pass
    try:
        return repr(value)
    except RecursionError:
        return type(value).__name__


def _digest(text: str) -> str:
    """Fixed-size stand-in for a large payload (an image as a data URL is megabytes)."""
    return mmh3.hash_bytes(text.encode("utf-8", "surrogatepass")).hex()


def _field(tag: str, value: str) -> str:
    return f"{tag}{len(value)}:{value}"


def _render_part(part: Any) -> str:
    if isinstance(part, str):
        return _field("c", part)
    if isinstance(part, dict):
        kind = part.get("type", "text")
        text = part.get("text")
        if kind == "text" and isinstance(text, str):
            return _field("c", text)
        image = part.get("image_url")
        if kind == "image_url" and isinstance(image, dict) and isinstance(image.get("url"), str):
            # Digest the URL directly: serializing a multi-megabyte data URL as JSON would
            # cost more than the rest of the request.
            detail = image.get("detail")
            return _field("m", _digest(f"image_url\x00{image['url']}\x00{detail}"))
    return _field("m", _digest(_canonical(part)))


def _render_content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return _field("c", content)
    if isinstance(content, list):
        return "".join([_render_part(part) for part in content])
    return _field("o", _canonical(content))


def _render_message(message: Any) -> str:
    if not isinstance(message, dict):
        return _RECORD + _field("o", _canonical(message))
    role = message.get("role")
    content = message.get("content")
    head = _RECORD + _field("r", role if isinstance(role, str) else _canonical(role))
    body = _field("c", content) if isinstance(content, str) else _render_content(content)
    # Most messages are just role and content: skip the lookups for the rare fields.
    if len(message) == ("role" in message) + ("content" in message):
        return head + body
    pieces = [head]
    name = message.get("name")
    if name is not None:
        pieces.append(_field("n", name if isinstance(name, str) else _canonical(name)))
    pieces.append(body)
    tool_calls = message.get("tool_calls")
    if tool_calls:
        pieces.append(_field("t", _canonical(tool_calls)))
    call_id = message.get("tool_call_id")
    if call_id is not None:
        pieces.append(_field("i", call_id if isinstance(call_id, str) else _canonical(call_id)))
    return "".join(pieces)


def render_chat(messages: Sequence[Any], tools: Any = None) -> str:
    """Render chat ``messages`` (and ``tools``, placed first) as prefix-stable text."""
    pieces: list[str] = []
    if tools:
        pieces.append(_TOOLS + _field("T", _canonical(tools)))
    if isinstance(messages, list | tuple):
        pieces.extend([_render_message(message) for message in messages])
    elif messages is not None:
        pieces.append(_render_message(messages))
    return "".join(pieces)


def _is_token_ids(values: list[Any]) -> bool:
    # Exact types on purpose: JSON true/false are bools, not token ids. Empty counts as ids.
    return set(map(type, values)) <= {int}


def render_completion(prompt: Any) -> str | list[int]:
    """Render a ``/v1/completions`` prompt: text stays text, token ids stay token ids.

    - ``str`` -> itself; ``list[int]`` -> the same ids;
    - a batch ``list[str]`` -> the prompts joined with `BATCH_SEPARATOR`;
    - a batch ``list[list[int]]`` -> the id lists concatenated;
    - anything else (None, numbers, objects, mixed lists) -> canonical JSON text, or ``""``
      for None and the empty list.
    """
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        if not prompt:
            return ""
        first = prompt[0]
        if type(first) is int and _is_token_ids(prompt):
            return prompt
        if isinstance(first, str) and all(isinstance(item, str) for item in prompt):
            return BATCH_SEPARATOR.join(prompt)
        if isinstance(first, list) and all(
            isinstance(item, list) and _is_token_ids(item) for item in prompt
        ):
            return [token for ids in prompt for token in ids]
    if prompt is None:
        return ""
    return _canonical(prompt)
