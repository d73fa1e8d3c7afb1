"""The forwarded body splices our members into the client's bytes and means what a re-encode
of the parsed body would: the tenant's cache_salt always, include_usage for streams."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from router.parse import Endpoint, forward_body, parse_request, splice_members

_RESERVED = {
    "model", "messages", "prompt", "stream", "stream_options", "max_tokens",
    "max_completion_tokens", "prompt_cache_key", "tools", "cache_salt",
}  # fmt: skip

_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12
) | st.sampled_from(["\u2028", '"quoted"', "back\\slash", "tab\there", "ünï ✓", "\x00\x1f"])
_scalar = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
_json = st.recursive(
    _scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)
_extra = st.dictionaries(_text.filter(lambda k: k not in _RESERVED), _json, max_size=5)


def _reencoded(body: dict[str, Any], salt: str, stream: bool, wants_usage: bool) -> Any:
    """What the router forwarded before splicing: the parsed body with our members set."""
    expected = dict(body)
    expected["cache_salt"] = salt
    if stream and not wants_usage:
        expected["stream_options"] = {**(expected.get("stream_options") or {}),
                                      "include_usage": True}  # fmt: skip
    return expected


@settings(max_examples=300, deadline=None)
@given(
    endpoint=st.sampled_from(["chat", "completions"]),
    extra=_extra,
    client_salt=st.none() | _json,
    stream=st.none() | st.booleans(),
    options=st.none() | st.just("absent") | st.dictionaries(_text, _json, max_size=2),
    include_usage=st.none() | st.booleans(),
    salt=_text,
    ascii_only=st.booleans(),
    indent=st.none() | st.just(2),
    lead=st.sampled_from(["", " ", "\n\t ", "\r\n"]),
)
def test_spliced_body_means_the_same_as_a_re_encode(
    endpoint: Endpoint,
    extra: dict[str, Any],
    client_salt: Any,
    stream: bool | None,
    options: Any,
    include_usage: bool | None,
    salt: str,
    ascii_only: bool,
    indent: int | None,
    lead: str,
) -> None:
    """Whatever the client sent, the worker reads the same JSON as a full re-encode gives."""
    body: dict[str, Any] = {"model": "m", **extra}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": 'héllo \u2028 "x"'}]
    else:
        body["prompt"] = "Once upon a time \\ \u00e9"
    if client_salt is not None:
        body["cache_salt"] = client_salt
    if stream is not None:
        body["stream"] = stream
    if options != "absent":
        if isinstance(options, dict) and include_usage is not None:
            options = {**options, "include_usage": include_usage}
        body["stream_options"] = options
    raw = (lead + json.dumps(body, ensure_ascii=ascii_only, indent=indent)).encode()
    parsed = parse_request(endpoint, raw)
    expected = _reencoded(body, salt, parsed.stream, parsed.client_wants_usage)
    assert json.loads(forward_body(parsed, salt)) == expected


def test_common_body_keeps_the_clients_bytes() -> None:
    """A request without cache_salt reaches the worker byte for byte, our salt put in front."""
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "1e2 \\u00e9"}], "t": 1.50}'
    forwarded = forward_body(parse_request("chat", raw), "s")
    assert forwarded == b'{"cache_salt":"s",' + raw[1:]


def test_client_salt_is_replaced_not_shadowed() -> None:
    """A client's cache_salt (under any spelling of the key) never survives next to ours."""
    for key in ("cache_salt", "cache\\u005fsalt"):
        raw = b'{"model": "m", "prompt": "p", "' + key.encode() + b'": "theirs"}'
        forwarded = forward_body(parse_request("completions", raw), "ours")
        assert json.loads(forwarded)["cache_salt"] == "ours"
        assert b"theirs" not in forwarded


def test_stream_gets_include_usage_spliced() -> None:
    """A stream without stream_options gets include_usage in the spliced members."""
    raw = b'{"model": "m", "prompt": "p", "stream": true}'
    forwarded = json.loads(forward_body(parse_request("completions", raw), "s"))
    assert forwarded["stream_options"] == {"include_usage": True}


def test_splice_refuses_what_is_not_an_object() -> None:
    """Splicing needs an opening brace; anything else is left to the re-encode."""
    assert splice_members(b" [1]", b'"a":1') is None
    assert splice_members(b"", b'"a":1') is None
    assert splice_members(b'\n{"b":2}', b'"a":1') == b'\n{"a":1,"b":2}'
