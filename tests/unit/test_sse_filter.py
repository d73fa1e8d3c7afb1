"""The streaming passthrough's pure parts: usage capture and removal in SSE, usage parsing,
and the decision header operators read."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from router.core.model import Decision, WorkerId
from router.proxy import SseUsageFilter, decision_header, parse_usage
from router.routing import Usage

USAGE = {
    "prompt_tokens": 120,
    "completion_tokens": 7,
    "total_tokens": 127,
    "prompt_tokens_details": {"cached_tokens": 96},
}


def _event(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _chunk(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        **extra,
    }


DONE = b"data: [DONE]\n\n"
CONTENT = [_event(_chunk(t)) for t in ("Hello", ", ", "wor", "ld — ünïcode ✓")]
USAGE_EVENT = _event({**_chunk(""), "choices": [], "usage": USAGE})
WITH_USAGE = b"".join(CONTENT) + USAGE_EVENT + DONE
WITHOUT_USAGE = b"".join(CONTENT) + DONE


def _run(stream_chunks: list[bytes], strip: bool) -> tuple[bytes, SseUsageFilter]:
    sse = SseUsageFilter(strip_usage=strip)
    out = b"".join(sse.feed(chunk) for chunk in stream_chunks) + sse.flush()
    return out, sse


def test_chunks_without_usage_pass_through_untouched() -> None:
    """Whole events without usage come out byte for byte, chunk for chunk."""
    sse = SseUsageFilter(strip_usage=True)
    for chunk in [*CONTENT, DONE]:
        assert sse.feed(chunk) == chunk
    assert sse.flush() == b""
    assert sse.usage is None


def test_usage_is_captured_from_the_final_chunk() -> None:
    """The usage report of the final chunk (tokens and cached tokens) is read."""
    _, sse = _run([WITH_USAGE], strip=False)
    assert sse.usage == Usage(prompt_tokens=120, cached_tokens=96, completion_tokens=7)


def test_usage_chunk_is_stripped_when_the_router_asked_for_it() -> None:
    """A client that did not ask for usage gets the stream without the usage-only chunk."""
    out, sse = _run([WITH_USAGE], strip=True)
    assert out == WITHOUT_USAGE
    assert sse.usage is not None
    assert sse.usage.cached_tokens == 96


def test_usage_chunk_is_kept_when_the_client_asked_for_it() -> None:
    """A client that asked for usage gets the stream exactly as the worker sent it."""
    out, sse = _run([WITH_USAGE], strip=False)
    assert out == WITH_USAGE
    assert sse.usage is not None


def test_null_usage_key_is_removed_from_ordinary_chunks_when_stripping() -> None:
    """With stripping on, ordinary chunks lose their "usage": null key and keep everything else."""
    chunk = _chunk("hi", usage=None)
    out, sse = _run([_event(chunk), DONE], strip=True)
    events = [e for e in out.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    payload = json.loads(events[0].removeprefix(b"data: "))
    expected = dict(chunk)
    del expected["usage"]
    assert payload == expected
    assert sse.usage is None


def test_null_usage_key_is_kept_when_not_stripping() -> None:
    """With stripping off, an ordinary chunk with "usage": null passes unchanged."""
    stream = _event(_chunk("hi", usage=None)) + DONE
    out, _ = _run([stream], strip=False)
    assert out == stream


def test_continuous_usage_on_content_chunks_is_read_and_content_kept() -> None:
    """A content chunk that also carries usage keeps its content when usage is stripped."""
    chunk = _chunk("tok", usage=USAGE)
    out, sse = _run([_event(chunk), DONE], strip=True)
    payload = json.loads(out.split(b"\n\n")[0].removeprefix(b"data: "))
    assert payload["choices"] == chunk["choices"]
    assert "usage" not in payload
    assert sse.usage is not None
    assert sse.usage.prompt_tokens == 120


def test_text_mentioning_usage_is_not_mistaken_for_a_report() -> None:
    """A generated token that quotes the word "usage" is left alone."""
    chunk = _chunk('the "usage" key')
    stream = _event(chunk) + _event({"note": 'x "usage"', "choices": []}) + DONE
    out, sse = _run([stream], strip=True)
    assert out == stream
    assert sse.usage is None


def test_malformed_events_pass_through() -> None:
    """Events the filter cannot parse are forwarded as they are, never dropped."""
    stream = b'data: {"usage": broken\n\n' + b': comment "usage"\n\n' + DONE
    out, sse = _run([stream], strip=True)
    assert out == stream
    assert sse.usage is None


def test_incomplete_tail_is_flushed_at_the_end() -> None:
    """Bytes after the last event boundary are not lost when the stream ends."""
    out, _ = _run([WITHOUT_USAGE + b"data: partial"], strip=True)
    assert out == WITHOUT_USAGE + b"data: partial"


def test_events_split_at_every_byte_offset() -> None:
    """However the stream is cut in two, output and captured usage are the same."""
    for strip, expected in ((True, WITHOUT_USAGE), (False, WITH_USAGE)):
        for cut in range(len(WITH_USAGE) + 1):
            out, sse = _run([WITH_USAGE[:cut], WITH_USAGE[cut:]], strip=strip)
            assert out == expected, (strip, cut)
            assert sse.usage == Usage(120, 96, 7), (strip, cut)


def test_one_byte_chunks() -> None:
    """A stream delivered one byte at a time still comes out whole, usage removed."""
    chunks = [WITH_USAGE[i : i + 1] for i in range(len(WITH_USAGE))]
    out, sse = _run(chunks, strip=True)
    assert out == WITHOUT_USAGE
    assert sse.usage is not None


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    cuts=st.lists(st.integers(0, len(WITH_USAGE)), max_size=12),
    strip=st.booleans(),
    with_usage=st.booleans(),
)
def test_any_chunking_gives_the_same_stream(cuts: list[int], strip: bool, with_usage: bool) -> None:
    """Any split of the stream into chunks yields exactly the bytes a single chunk would."""
    stream = WITH_USAGE if with_usage else WITHOUT_USAGE
    points = sorted({min(c, len(stream)) for c in cuts})
    bounds = [0, *points, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    out, sse = _run(chunks, strip=strip)
    whole, reference = _run([stream], strip=strip)
    assert out == whole
    assert out == (WITHOUT_USAGE if strip or not with_usage else WITH_USAGE)
    assert sse.usage == reference.usage


# parse_usage --------------------------------------------------------------------------------


def test_parse_usage_reads_vllm_usage() -> None:
    """prompt, cached and completion tokens are read from an OpenAI usage object."""
    assert parse_usage(USAGE) == Usage(120, 96, 7)


def test_parse_usage_without_details_has_unknown_cached_tokens() -> None:
    """A worker that does not report prompt_tokens_details gives cached_tokens None, not 0."""
    assert parse_usage({"prompt_tokens": 5, "completion_tokens": 1}) == Usage(5, None, 1)
    assert parse_usage({"prompt_tokens": 5, "prompt_tokens_details": None}) == Usage(5, None, 0)
    details = {"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": "x"}}
    assert parse_usage(details) == Usage(5, None, 0)


def test_parse_usage_rejects_non_usage() -> None:
    """Anything without an integer prompt_tokens is no usage report."""
    values: list[object] = [None, [], "usage", {}, {"prompt_tokens": "5"}, {"prompt_tokens": 1.5}]
    for value in values:
        assert parse_usage(value) is None


# decision_header ----------------------------------------------------------------------------


def test_decision_header_states_reason_and_numbers() -> None:
    """The decision header carries reason, policy, matches, blocks, load and cap."""
    decision = Decision(
        worker=WorkerId("w1"),
        reason="warm",
        matched_blocks=12,
        best_available_blocks=14,
        affinity_worker=WorkerId("w2"),
        cap=5,
        total_blocks=20,
    )
    assert decision_header(decision, "cache_aware", 3) == (
        "warm; policy=cache_aware; matched=12; best=14; blocks=20; load=3; cap=5"
    )


def test_decision_header_without_cap_shows_a_dash() -> None:
    """Unbounded policies show cap=- rather than a misleading number."""
    decision = Decision(WorkerId("w"), "fallback", 0, 0, None)
    header = decision_header(decision, "round_robin", 0)
    assert header.startswith("fallback; policy=round_robin;")
    assert header.endswith("cap=-")
    assert header.isascii()
