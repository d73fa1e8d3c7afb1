"""The redacted shape of a piece of prompt text: what kind of characters, never which.

The advisor shows operators what the varying head of a badly shaped prompt looks like, so
they can find it in their templates, without ever repeating tenant content. Every run of
letters or digits is replaced by a class token; only ASCII punctuation and single spaces
survive, because they carry the structure (``-``, ``:``, ``/``) and no content:

- digits only: ``<digits:N>``;
- hexadecimal with both letters and digits, 8 or more: ``<hex:N>`` (lower or upper case);
- capitals only: ``[A-Z]{N}``; capitals and digits: ``[A-Z0-9]{N}``;
- other letter runs (words): ``<word>``, and several words in a row ``<words:K>``;
- anything else alphanumeric (mixed case with digits, non-ASCII letters): ``<alnum:N>``;
- any other character (non-ASCII symbols, control characters): ``?``; whitespace runs: one
  space (``\\n`` when the run holds a line break).

So ``Request 7F3A-00012345 at 2026-05-12T10:00:00Z`` becomes ``<word> [A-Z0-9]{4}-<digits:8>
<word> <digits:4>-<digits:2>-[A-Z0-9]{5}:<digits:2>:[A-Z0-9]{3}``. A word's length is left out
on purpose: the lengths of short words narrow down which word it was.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[^\W_]+|\s+|.", re.DOTALL)
_HEX = re.compile(r"[0-9a-f]+|[0-9A-F]+")
_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_WORD_RUN = re.compile(r"<word>(?: <word>)+")
ELLIPSIS = "…"


def _classify(run: str) -> str:
    length = len(run)
    if not run.isascii():
        return f"<alnum:{length}>"
    if run.isdigit():
        return f"<digits:{length}>"
    has_digit = any(c.isdigit() for c in run)
    if has_digit and length >= 8 and _HEX.fullmatch(run):
        return f"<hex:{length}>"
    if run.isupper():
        return f"[A-Z0-9]{{{length}}}" if has_digit else f"[A-Z]{{{length}}}"
    if not has_digit:
        return "<word>"
    return f"<alnum:{length}>"


def redact_shape(text: str, max_chars: int = 160) -> str:
    """The shape of ``text`` (see the module docstring); only its first ``max_chars``
    characters are described, and ``…(+N chars)`` says how much was left out."""
    parts: list[str] = []
    for match in _TOKEN.finditer(text[:max_chars]):
        token = match.group()
        if token.isspace():
            parts.append("\n" if "\n" in token else " ")
        elif token[0].isalnum():
            parts.append(_classify(token))
        else:
            parts.append(token if token in _PUNCTUATION else "?")
    shape = _WORD_RUN.sub(_count_words, "".join(parts)).strip()
    if len(text) > max_chars:
        shape += f"{ELLIPSIS}(+{len(text) - max_chars} chars)"
    return shape


def _count_words(match: re.Match[str]) -> str:
    return f"<words:{match.group().count('<word>')}>"
