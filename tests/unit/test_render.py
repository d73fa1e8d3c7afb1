"""Rendering request bodies: same leading messages, same leading text; odd shapes never fail."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from router.core.render import BATCH_SEPARATOR, render_chat, render_completion

PROPERTY = settings(max_examples=80, deadline=None, derandomize=True, database=None)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)

text_part = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=40)})
image_part = st.fixed_dictionaries(
    {
        "type": st.just("image_url"),
        "image_url": st.fixed_dictionaries({"url": st.text(max_size=40)}),
    }
)
content = st.none() | st.text(max_size=80) | st.lists(text_part | image_part, max_size=3)
tool_call = st.fixed_dictionaries(
    {
        "id": st.text(max_size=8),
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {"name": st.text(max_size=8), "arguments": st.text(max_size=20)}
        ),
    }
)
message: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": content},
    optional={
        "name": st.text(max_size=8),
        "tool_calls": st.lists(tool_call, max_size=2),
        "tool_call_id": st.text(max_size=8),
    },
)
# Odd shapes mixed in: a message list may hold anything JSON can.
any_message = message | json_values


@PROPERTY
@given(messages=st.lists(any_message, min_size=1, max_size=6), tools=st.none() | json_values)
def test_extending_a_conversation_keeps_its_rendering_as_prefix(
    messages: list[Any], tools: Any
) -> None:
    """A conversation extended by one message starts with the shorter one's rendering."""
    shorter = render_chat(messages[:-1], tools)
    longer = render_chat(messages, tools)
    assert longer.startswith(shorter)
    assert len(longer) > len(shorter)


@PROPERTY
@given(a=st.lists(message, min_size=1, max_size=4), b=st.lists(message, min_size=1, max_size=4))
def test_different_conversations_render_differently(a: list[Any], b: list[Any]) -> None:
    """Field boundaries are self-delimiting: distinct message lists never render alike."""
    normalised_a, normalised_b = _normalise(a), _normalise(b)
    assert (render_chat(a) == render_chat(b)) == (normalised_a == normalised_b)


def _normalise(messages: list[Any]) -> list[Any]:
    """Equivalences the rendering keeps on purpose: a string content is one text part,
    absent content is an empty part list, and empty tool_calls are absent."""
    out = []
    for m in messages:
        parts = m["content"]
        if parts is None:
            parts = []
        elif isinstance(parts, str):
            parts = [{"type": "text", "text": parts}]
        out.append(
            (
                m["role"],
                m.get("name"),
                repr(parts),
                repr(m.get("tool_calls") or None),
                m.get("tool_call_id"),
            )
        )
    return out


def test_tools_render_first_and_in_canonical_order() -> None:
    """Tool schemas come before the messages, and their key order does not matter."""
    messages = [{"role": "user", "content": "hi"}]
    tools_a = [{"type": "function", "function": {"name": "f", "parameters": {"a": 1, "b": 2}}}]
    tools_b = [{"function": {"parameters": {"b": 2, "a": 1}, "name": "f"}, "type": "function"}]
    with_tools = render_chat(messages, tools_a)
    assert with_tools == render_chat(messages, tools_b)
    assert with_tools.endswith(render_chat(messages))
    assert with_tools.index('"name":"f"') < with_tools.index("hi")
    assert render_chat(messages, []) == render_chat(messages, None) == render_chat(messages)


def test_embedded_records_cannot_merge_messages() -> None:
    """A message whose text mimics the next message's record still renders differently."""
    second = {"role": "user", "content": "b"}
    two = [{"role": "user", "content": "a"}, second]
    forged = [{"role": "user", "content": "a" + render_chat([second])}]
    assert render_chat(two) != render_chat(forged)
    assert render_chat([{"role": "user", "content": "ab"}]) != render_chat(two)
    forged_role = [{"role": "user" + render_chat([second])[1:], "content": "a"}]
    assert render_chat(forged_role) != render_chat(two)


@PROPERTY
@given(
    contents=st.lists(st.text(alphabet="ab:\x1e\x1dcr0123456789", max_size=8), min_size=1),
    data=st.data(),
)
def test_rendering_is_injective_on_tricky_text(contents: list[str], data: st.DataObject) -> None:
    """Texts made of the format's own characters never make two conversations collide."""
    other = data.draw(st.lists(st.text(alphabet="ab:\x1e\x1dcr0123456789", max_size=8)))
    a = [{"role": "user", "content": c} for c in contents]
    b = [{"role": "user", "content": c} for c in other]
    assert (render_chat(a) == render_chat(b)) == (contents == other)


def test_string_content_equals_single_text_part() -> None:
    """`content: "x"` and `content: [{"type": "text", "text": "x"}]` are the same prompt."""
    plain = [{"role": "user", "content": "describe"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "describe"}]}]
    assert render_chat(plain) == render_chat(parts)


def test_images_render_as_fixed_size_digests() -> None:
    """A multi-megabyte data URL adds a few dozen characters, and different images differ."""
    big = "data:image/png;base64," + "A" * 2_000_000

    def msgs(url: str) -> list[Any]:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]

    rendered = render_chat(msgs(big))
    assert len(rendered) < 100
    assert rendered != render_chat(msgs(big[:-1] + "B"))
    assert rendered == render_chat(msgs(big))


def test_tool_calls_and_results_are_rendered() -> None:
    """Tool calls and tool results are part of the prefix."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    base = [{"role": "assistant", "content": None, "tool_calls": [call]}]
    other = [{"role": "assistant", "content": None, "tool_calls": [{**call, "id": "c2"}]}]
    assert render_chat(base) != render_chat(other)
    result_a = [*base, {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    result_b = [*base, {"role": "tool", "tool_call_id": "c1", "content": "43"}]
    assert render_chat(result_a) != render_chat(result_b)


@PROPERTY
@given(messages=json_values, tools=json_values)
def test_odd_chat_shapes_do_not_raise(messages: Any, tools: Any) -> None:
    """Any parsed JSON renders to a string (costing a cache hit, never the request)."""
    assert isinstance(render_chat(messages, tools), str)


def test_non_json_values_do_not_raise() -> None:
    """Even values JSON cannot hold (mixed-type keys, deep nesting) render to a string."""
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    assert isinstance(render_chat([{1: "a", "b": 2}, deep], {1: 2, "x": 3}), str)
    assert isinstance(render_completion({"x": {1, 2}}), str)


@PROPERTY
@given(prompt=json_values)
def test_odd_completion_shapes_do_not_raise(prompt: Any) -> None:
    """Any parsed JSON prompt renders to text or token ids."""
    rendered = render_completion(prompt)
    assert isinstance(rendered, str) or all(type(t) is int for t in rendered)


def test_completion_prompt_shapes() -> None:
    """Text stays text, ids stay ids, batches are joined in the documented way."""
    assert render_completion("hello") == "hello"
    assert render_completion([1, 2, 3]) == [1, 2, 3]
    assert render_completion(["a", "b"]) == f"a{BATCH_SEPARATOR}b"
    assert render_completion([[1, 2], [], [3]]) == [1, 2, 3]
    assert render_completion([]) == ""
    assert render_completion(None) == ""
    assert render_completion([True, False]) == "[true,false]"
    assert render_completion([1, "a"]) == '[1,"a"]'
