"""Hypothesis fuzzing of request bodies and headers against a real router subprocess.

Properties, for every generated request: no 5xx from the router itself (a worker's answer names
the worker in ``x-prefix-router-worker``); a 4xx from the router has an OpenAI error body, aiohttp's
own parser rejections of header-level garbage included (`router.http_server`); no request hangs
(every exchange has a timeout); the client's ``cache_salt`` never reaches the worker. At the end
the router process is alive, answers ``/health`` and logged no unhandled error.
``FUZZ_EXAMPLES`` raises every example count.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.conftest import ADMIN_TOKEN, API_KEY, SALT_SECRET, Target, examples, raw_exchange

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
TIMEOUT_S = 15.0


def fuzz_settings(default: int) -> settings:
    return settings(
        max_examples=examples(default),
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module")
def client(target: Target) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=target.url, timeout=TIMEOUT_S, headers=target.auth()) as http:
        yield http


def check(status: int, headers: httpx.Headers | dict[str, str], body: bytes) -> None:
    """The properties every answer must have."""
    lowered = {k.lower(): v for k, v in headers.items()}
    from_worker = "x-prefix-router-worker" in lowered
    assert status < 500 or from_worker, f"router answered {status}: {body[:200]!r}"
    if 400 <= status < 500 and not from_worker:
        assert lowered.get("content-type", "").startswith("application/json"), body[:200]
        error = json.loads(body)["error"]
        assert isinstance(error["message"], str)
        assert isinstance(error["type"], str)


def post(client: httpx.Client, path: str, content: bytes, **headers: str) -> httpx.Response:
    response = client.post(path, content=content, headers=headers)
    check(response.status_code, response.headers, response.content)
    return response


def chat(**fields: Any) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "fuzz"}],
        "max_tokens": 2,
        **fields,
    }


# Integers a worker answers quickly: small, negative, or far past any context (refused).
SMALL_OR_ABSURD = st.one_of(st.integers(-(2**70), 0), st.integers(1, 16), st.integers(10**6, 2**70))
JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        SMALL_OR_ABSURD,
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=40),
    ),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
VALIDATED_FIELDS = [
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "prompt_cache_key",
    "tools",
    "cache_salt",
]


@fuzz_settings(40)
@given(raw=st.binary(max_size=2000))
def test_malformed_json_bytes(client: httpx.Client, raw: bytes) -> None:
    """Arbitrary bytes as a body get an OpenAI-style 4xx (or a worker's answer), never a 5xx."""
    post(client, CHAT, raw, **{"Content-Type": "application/json"})


@fuzz_settings(60)
@given(field=st.sampled_from(VALIDATED_FIELDS), value=JSON_VALUES)
def test_wrong_types_for_validated_fields(client: httpx.Client, field: str, value: Any) -> None:
    """Any JSON value in any validated chat field is refused cleanly or served."""
    post(client, CHAT, json.dumps({**chat(stream=False), field: value}).encode())


@fuzz_settings(30)
@given(
    field=st.sampled_from(["prompt", "max_tokens", "stream"]),
    value=st.one_of(JSON_VALUES, st.lists(st.integers(-(2**70), 2**70), max_size=50)),
)
def test_wrong_types_for_completions(client: httpx.Client, field: str, value: Any) -> None:
    """/v1/completions with any prompt (token ids out of range included) never gets a 5xx."""
    body = {"model": "sim-model", "prompt": "fuzz", "max_tokens": 2, field: value}
    post(client, COMPLETIONS, json.dumps(body).encode())


@fuzz_settings(12)
@given(depth=st.integers(1, 200_000), brackets=st.sampled_from(["[]", "{}"]))
def test_deeply_nested_bodies(client: httpx.Client, depth: int, brackets: str) -> None:
    """Deep nesting, as the whole body or inside a message, never crashes the parser."""
    nested = "[" * depth + "]" * depth if brackets == "[]" else '{"a":' * depth + "1}" * depth
    post(client, CHAT, nested.encode())
    wrapped = json.dumps(chat())[:-1] + f', "extra": {nested}}}'
    post(client, CHAT, wrapped.encode())


@fuzz_settings(8)
@given(size=st.integers(200 * 1024, 2 * 1024 * 1024))
def test_huge_bodies(client: httpx.Client, size: int) -> None:
    """A body over max_body_bytes gets 413; one just under it is parsed and answered."""
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * size}])).encode()
    response = post(client, CHAT, big)
    if len(big) > 256 * 1024:
        assert response.status_code == 413
    else:
        assert response.status_code != 413


@fuzz_settings(30)
@given(
    prefix=st.text(max_size=20),
    garbage=st.binary(min_size=1, max_size=20).filter(lambda b: not _is_utf8(b)),
    where=st.sampled_from(["content", "model", "key"]),
)
def test_invalid_utf8(client: httpx.Client, prefix: str, garbage: bytes, where: str) -> None:
    """Invalid UTF-8 inside JSON strings gets a 400, not a crash."""
    text = json.dumps(prefix).encode()[:-1] + garbage + b'"'
    if where == "key":
        body = b'{"model": "sim-model", ' + text + b': 1, "messages": []}'
    elif where == "model":
        body = b'{"model": ' + text + b', "messages": [{"role": "user", "content": "x"}]}'
    else:
        body = b'{"messages": [{"role": "user", "content": ' + text + b"}]}"
    response = post(client, CHAT, body)
    assert response.status_code == 400


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


@fuzz_settings(10)
@given(count=st.integers(1, 30_000), content=st.sampled_from(["x", "", "a longer message"]))
def test_giant_messages_arrays(client: httpx.Client, count: int, content: str) -> None:
    """Thousands of messages are served or refused by size, never a 5xx."""
    messages = [{"role": "user", "content": content}] * count
    post(client, CHAT, json.dumps(chat(messages=messages)).encode())


@fuzz_settings(30)
@given(
    max_tokens=st.one_of(
        SMALL_OR_ABSURD, st.floats(), st.text(max_size=5), st.booleans(), st.just(-1)
    )
)
def test_negative_and_absurd_max_tokens(client: httpx.Client, max_tokens: Any) -> None:
    """Negative, huge, fractional or non-numeric max_tokens: a clean 4xx or a worker's answer."""
    body = json.dumps(chat(max_tokens=max_tokens)).encode()
    response = post(client, CHAT, body)
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens < 0:
        assert response.status_code == 400


@fuzz_settings(25)
@given(
    content_type=st.one_of(
        st.sampled_from(
            [
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
                "application/json; charset=latin-1",
                "application/octet-stream",
                "",
            ]
        ),
        # httpx refuses surrounding whitespace; header-level garbage is test_header_floods'.
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(str.strip),
    )
)
def test_odd_content_types(client: httpx.Client, content_type: str) -> None:
    """The body is judged by its bytes whatever Content-Type says."""
    response = post(client, CHAT, json.dumps(chat()).encode(), **{"Content-Type": content_type})
    assert response.status_code == 200


def _raw_request(headers: list[tuple[bytes, bytes]], body: bytes = b"") -> bytes:
    lines = [
        b"POST /v1/chat/completions HTTP/1.1",
        b"Host: 127.0.0.1",
        b"Connection: close",
        b"Authorization: Bearer " + API_KEY.encode(),
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        *(name + b": " + value for name, value in headers),
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _raw_check(target: Target, request: bytes) -> int:
    """Send ``request`` as is; the answer must be a success or a router 4xx with an OpenAI
    error body (parser rejections included)."""
    status, body = raw_exchange(target.port, request, timeout=TIMEOUT_S)
    assert status < 500, f"router answered {status}: {body[:200]!r}"
    if status >= 400:
        error = json.loads(body)["error"]
        assert isinstance(error["message"], str)
        assert isinstance(error["type"], str)
    return status


HEADER_NAMES = st.binary(min_size=1, max_size=30).map(
    lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E and c != 0x3A) or b"X"
)
HEADER_VALUES = st.binary(max_size=200).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@fuzz_settings(30)
@given(
    count=st.integers(0, 300),
    value_size=st.integers(0, 12_000),
    extra=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=5),
)
def test_header_floods(target: Target, count: int, value_size: int, extra: list[Any]) -> None:
    """Many headers, huge or binary header values: a 4xx or an answer, the connection closes."""
    headers = [(b"X-Flood-%d" % i, b"v" * value_size) for i in range(count)] + extra
    body = json.dumps(chat()).encode()
    status = _raw_check(target, _raw_request(headers, body))
    if count > 128 or (count > 0 and value_size > 8190):
        assert 400 <= status < 500


def tenant_salt(tenant: str) -> str:
    mac = hmac.new(SALT_SECRET.encode(), tenant.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def sim_url(target: Target) -> str:
    """The simulated worker's URL, as the router lists it."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    workers = httpx.get(target.url + "/admin/workers", headers=admin, timeout=5).json()
    return str(workers["workers"][0]["url"])


@fuzz_settings(20)
@given(salt=JSON_VALUES, endpoint=st.sampled_from([CHAT, COMPLETIONS]))
def test_client_cache_salt_never_reaches_the_worker(
    client: httpx.Client, sim_url: str, salt: Any, endpoint: str
) -> None:
    """Whatever cache_salt a client sends, the worker sees only the tenant's HMAC salt (in this
    request and in every earlier one of the module)."""
    body: dict[str, Any] = {"model": "sim-model", "max_tokens": 2, "cache_salt": salt}
    if endpoint == CHAT:
        body["messages"] = [{"role": "user", "content": "salted"}]
    else:
        body["prompt"] = "salted"
    response = post(client, endpoint, json.dumps(body).encode())
    assert response.status_code == 200
    seen = httpx.get(sim_url + "/sim/requests?limit=1000", timeout=TIMEOUT_S).json()
    records = seen["requests"] if isinstance(seen, dict) else seen
    salts = {r["cache_salt"] for r in records}
    assert salts == {tenant_salt("fuzz")}


def test_router_survives_the_fuzzing(target: Target) -> None:
    """After every fuzzer above, the router process is alive, healthy and logged no crash."""
    assert target.router.alive()
    assert httpx.get(target.url + "/health", timeout=5).status_code == 200
    log = target.log_text()
    assert "unhandled error" not in log
    # Every line is one JSON object: a client's garbage cannot write free text into the log.
    # The only tracebacks are aiohttp's parser rejections; any other is a crash in the router.
    for line in log.splitlines():
        entry = json.loads(line)
        if "exc" in entry:
            assert entry["logger"].startswith("aiohttp"), entry
            assert "aiohttp.http_exceptions." in entry["exc"], entry
