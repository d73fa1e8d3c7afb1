"""The simulator's tokenizer and chat template give stable, prefix-preserving token ids."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.sim.tokenizer import decode, encode, filler_text, filler_token, render_chat


@settings(deadline=None)
@given(st.text())
def test_decode_inverts_encode(text: str) -> None:
    """Any text survives a round trip through token ids."""
    assert decode(encode(text)) == text


@settings(deadline=None)
@given(st.text(), st.text(), st.text())
def test_texts_with_a_common_prefix_share_leading_tokens(prefix: str, a: str, b: str) -> None:
    """Two texts that share their first 4*m UTF-8 bytes share their first m tokens."""
    common = len(prefix.encode("utf-8")) // 4
    assert encode(prefix + a)[:common] == encode(prefix + b)[:common]


def test_token_count_is_about_a_quarter_of_the_bytes() -> None:
    """Full 4-byte pieces are one token each; a short tail is one more."""
    assert len(encode("abcdefgh")) == 2
    assert len(encode("abcdefghi")) == 3
    assert encode("") == []


def test_short_tails_of_different_lengths_get_different_ids() -> None:
    """'a' and 'a\\x00' are different texts and different tokens."""
    assert encode("a") != encode("a\x00")


def test_filler_tokens_are_deterministic_and_decode_to_their_text() -> None:
    """Generated token k is always the same 4-character piece."""
    assert filler_text(3) == filler_text(3)
    assert len(filler_text(0)) == 4
    for index in range(50):
        assert encode(filler_text(index)) == [filler_token(index)]


MessageList = list[dict[str, Any]]

SYSTEM: MessageList = [{"role": "system", "content": "You are terse. " * 20}]


def tokens_of(messages: MessageList, tools: list[Any] | None = None) -> list[int]:
    return encode(render_chat(messages, tools))


def test_chats_with_the_same_leading_messages_share_leading_tokens() -> None:
    """A follow-up turn repeats the earlier turns' tokens exactly before adding its own."""
    turn1 = [*SYSTEM, {"role": "user", "content": "What is the capital of France?"}]
    turn2 = [
        *turn1,
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    history = render_chat(turn1, add_generation_prompt=False)
    shared = len(history.encode("utf-8")) // 4
    assert shared > 30
    assert tokens_of(turn1)[:shared] == tokens_of(turn2)[:shared]


def test_tools_come_first_and_their_key_order_does_not_matter() -> None:
    """Tool schemas render canonically at the start, so reordered keys give the same tokens."""
    tool_a = {"type": "function", "function": {"name": "f", "parameters": {"a": 1, "b": 2}}}
    tool_b = {"function": {"parameters": {"b": 2, "a": 1}, "name": "f"}, "type": "function"}
    assert tokens_of(SYSTEM, [tool_a]) == tokens_of(SYSTEM, [tool_b])
    assert render_chat(SYSTEM, [tool_a]).startswith("<|tools|>")
    assert tokens_of(SYSTEM, [tool_a])[:4] != tokens_of(SYSTEM)[:4]


def test_every_message_field_that_changes_the_prompt_changes_the_tokens() -> None:
    """Role, content parts, names, tool calls and tool results all reach the prompt."""
    base = [{"role": "user", "content": "hi"}]
    variants: list[MessageList] = [
        [{"role": "system", "content": "hi"}],
        [{"role": "user", "content": [{"type": "text", "text": "hi!"}]}],
        [{"role": "user", "content": "hi", "name": "bob"}],
        [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}],
        [{"role": "tool", "content": "42", "tool_call_id": "c1"}],
    ]
    rendered = {render_chat(base)} | {render_chat(v) for v in variants}
    assert len(rendered) == len(variants) + 1


def test_text_parts_render_like_a_plain_string() -> None:
    """Content given as text parts gives the same prompt as the joined string."""
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert render_chat(parts) == render_chat([{"role": "user", "content": "ab"}])
