"""The simulator's deterministic tokenizer, chat template and generated text.

Tokenizer: the UTF-8 bytes of the text are cut into 4-byte pieces, one token per piece. A
full piece is the token id ``int.from_bytes(piece, "little")`` (0 .. 2**32-1); a shorter
final piece of k bytes (1 <= k <= 3) is ``2**32 + (k << 24) + int.from_bytes(piece,
"little")``, so every byte string has exactly one token sequence and `decode` inverts
`encode`. Texts that share their first 4*m bytes share their first m tokens, which is all
prefix caching needs; the token count is about a quarter of the byte count, close to what
real BPE tokenizers give for English. The bulk of the work is one C-level `array` copy.

Chat template (the simulator's own, not any model's): the tool schemas first, if any, as
``<|tools|>`` followed by their canonical JSON (sorted keys, no spaces); then every message
in order as ``<|ROLE|>``, an optional ``name=NAME;`` and ``tool_call_id=ID;``, the content
(a string as is; a list of parts as text parts joined, other parts as canonical JSON),
assistant ``tool_calls`` as canonical JSON, and ``<|end|>`` plus a newline; finally the
generation prompt ``<|assistant|>`` (unless ``add_generation_prompt`` is false). Two chats
with the same leading messages and tools therefore render to the same leading bytes.

Generated text: token k of a completion is the 4-byte piece k (cyclically) of a fixed Latin
filler sentence, so outputs are reproducible and each token is one whole word fragment.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

TAIL_BASE = 1 << 32
"""Token ids at or above this encode a final piece shorter than 4 bytes."""

_FILLER = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt "
    "ut labore et dolore magna aliqua ut enim ad minim veniam quis nostrud exercitation "
)
_FILLER_PIECES: tuple[str, ...] = tuple(
    _FILLER[i : i + 4] for i in range(0, len(_FILLER) - len(_FILLER) % 4, 4)
)

_json_encoder = msgspec.json.Encoder(order="sorted")


def encode(text: str) -> list[int]:
    """Token ids of ``text`` (see the module docstring for the scheme)."""
    data = text.encode("utf-8")
    full = len(data) - len(data) % 4
    words = array("I")
    if words.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte "I"
        raise RuntimeError("array('I') must have 4-byte items")
    words.frombytes(data[:full])
    if sys.byteorder == "big":  # pragma: no cover - ids are defined little-endian
        words.byteswap()
    ids = words.tolist()
    tail = data[full:]
    if tail:
        ids.append(TAIL_BASE + (len(tail) << 24) + int.from_bytes(tail, "little"))
    return ids


def decode(ids: Iterable[int]) -> str:
    """Inverse of `encode` for ids it produced (errors='replace' on anything else)."""
    parts = bytearray()
    for token in ids:
        if token >= TAIL_BASE:
            length = (token - TAIL_BASE) >> 24
            parts += (token & 0xFFFFFF).to_bytes(3, "little")[:length]
        else:
            parts += token.to_bytes(4, "little")
    return parts.decode("utf-8", errors="replace")


def filler_text(index: int) -> str:
    """Text of generated token ``index`` (0-based)."""
    return _FILLER_PIECES[index % len(_FILLER_PIECES)]


def filler_token(index: int) -> int:
    """Token id of generated token ``index`` (0-based)."""
    return int.from_bytes(filler_text(index).encode("ascii"), "little")


def canonical_json(value: Any) -> str:
    """Stable JSON for rendering structured parts into the prompt."""
    return _json_encoder.encode(value).decode("utf-8")


def _render_content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        rendered: list[str] = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                text = part.get("text")
                rendered.append(text if isinstance(text, str) else canonical_json(text))
            else:
                rendered.append(canonical_json(part))
        return "".join(rendered)
    return canonical_json(content)


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Any] | None = None,
    *,
    add_generation_prompt: bool = True,
) -> str:
    """Render a chat with the simulator's template (see the module docstring)."""
    out: list[str] = []
    if tools:
        out.append("<|tools|>")
        out.append(canonical_json(list(tools)))
        out.append("<|end|>\n")
    for message in messages:
        out.append(f"<|{message.get('role')}|>")
        name = message.get("name")
        if name is not None:
            out.append(f"name={name};")
        tool_call_id = message.get("tool_call_id")
        if tool_call_id is not None:
            out.append(f"tool_call_id={tool_call_id};")
        out.append(_render_content(message.get("content")))
        tool_calls = message.get("tool_calls")
        if tool_calls:
            out.append(canonical_json(tool_calls))
        out.append("<|end|>\n")
    if add_generation_prompt:
        out.append("<|assistant|>")
    return "".join(out)
