"""The router's exact mode without vLLM: conversation building, template handling, tokenizing.

Uses the tiny tokenizer (built locally with the project's interpreter: needs tokenizers and
transformers, not torch). The real-vLLM tier checks the same code token for token against
vLLM's renderer; these tests pin the individual rules quickly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from router.core.vllm_hash import VllmBlockHasher
from router.exact import (
    ExactConfig,
    ExactHasher,
    ExactModeError,
    conversation,
    detect_content_format,
    normalise_tools,
)
from tests.vllm.env import cache_root
from tests.vllm.tiny_model import CHAT_TEMPLATE, ensure_tiny_model

BOS = 0


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    return ensure_tiny_model(cache_root(), Path(sys.executable), tokenizer_only=True)


@pytest.fixture(scope="module")
def exact(tokenizer_dir: Path) -> ExactHasher:
    return ExactHasher(
        ExactConfig(tokenizer_dir, block_size=4, lora_adapters={"sql": "/adapters/sql"})
    )


def test_content_format_detection() -> None:
    """Templates that loop over message content get parts; the others get one string."""
    assert detect_content_format(CHAT_TEMPLATE) == "string"
    looping = (
        "{% for m in messages %}{% for part in m['content'] %}{{ part.text }}{% endfor %}"
        "{% endfor %}"
    )
    assert detect_content_format(looping) == "openai"
    aliased = (
        "{% set msgs = messages[1:] %}{% for m in msgs %}"
        "{% for p in m.content %}{{ p }}{% endfor %}{% endfor %}"
    )
    assert detect_content_format(aliased) == "openai"
    assert detect_content_format("{% for x in %}") == "string"  # unparsable: vLLM's default


def test_text_parts_are_joined_or_kept_by_format() -> None:
    """Several text parts become one newline-joined string, or stay parts for 'openai'."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}]
    assert conversation(messages, "string", "") == [{"role": "user", "content": "a\nb"}]
    assert conversation(messages, "openai", "") == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert conversation([{"role": "assistant", "content": None}], "string", "") == [
        {"role": "assistant", "content": ""}
    ]


def test_billing_header_line_is_dropped_from_system_text() -> None:
    """A per-request attribution line in the system prompt does not break prefix sharing."""
    messages = [{"role": "system", "content": "x-anthropic-billing-header: cch=1\nBe brief."}]
    assert conversation(messages, "string", "")[0]["content"] == "Be brief."


def test_developer_messages_become_one_leading_system_message() -> None:
    """Without 'developer' in the template, developer and system text merge at the front."""
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "developer", "content": "D"},
    ]
    assert conversation(messages, "string", "{{ messages }}") == [
        {"role": "system", "content": "S\n\nD"},
        {"role": "user", "content": "U"},
    ]
    kept = conversation(messages, "string", "{% if m.role == 'developer' %}{% endif %}")
    assert [turn["role"] for turn in kept] == ["system", "user", "developer"]


def test_tool_calls_are_parsed_and_ordered_like_vllms() -> None:
    """Tool-call arguments become objects, keys in OpenAI's declared order, junk dropped."""
    call = {
        "type": "function",
        "extra": 1,
        "function": {"name": "f", "arguments": '{"x": 1}'},
        "id": "c1",
    }
    turn = conversation(
        [{"role": "assistant", "content": "", "tool_calls": [call, {**call, "id": "c2",
          "function": {"name": "g", "arguments": "not json"}}]}], "string", "",
    )[0]  # fmt: skip
    first, second = turn["tool_calls"]
    assert list(first) == ["id", "function", "type"]
    assert first["function"] == {"arguments": {"x": 1}, "name": "f"}
    assert list(first["function"]) == ["arguments", "name"]
    assert second["function"]["arguments"] == {}


def test_tools_are_normalised_like_vllms_models() -> None:
    """Tools reach the template as vLLM's pydantic models dump them."""
    tools = [{"type": "function", "function": {"name": "f"}, "defer_loading": True}]
    assert normalise_tools(tools) == [
        {
            "type": "function",
            "function": {"name": "f", "description": None, "parameters": None,
                         "defer_loading": True},
            "defer_loading": True,
        }
    ]  # fmt: skip
    assert normalise_tools(None) is None


def test_chat_gets_bos_from_the_template_and_completions_from_the_tokenizer(
    exact: ExactHasher,
) -> None:
    """Chat prompts carry one BOS (the template's); completion text gets the tokenizer's."""
    chat = exact.prompts.prompt_tokens("chat", {"messages": [{"role": "user", "content": "hi"}]})
    assert chat[0] == BOS
    assert chat.count(BOS) == 1
    text = exact.prompts.prompt_tokens("completions", {"prompt": "hello"})
    assert text[0] == BOS
    bare = exact.prompts.prompt_tokens(
        "completions", {"prompt": "hello", "add_special_tokens": False}
    )
    assert [BOS, *bare] == text
    assert exact.prompts.prompt_tokens("completions", {"prompt": ["hello", "other"]}) == text
    assert exact.prompts.prompt_tokens("completions", {"prompt": [7, 8, 9]}) == [7, 8, 9]


def test_generation_prompt_is_added_unless_disabled(exact: ExactHasher) -> None:
    """add_generation_prompt defaults to true, as in vLLM's chat endpoint."""
    messages = [{"role": "user", "content": "hi"}]
    default = exact.prompts.chat_text({"messages": messages})
    without = exact.prompts.chat_text({"messages": messages, "add_generation_prompt": False})
    assert default == without + "<|im_start|>assistant\n"


def test_request_chain_uses_salt_and_lora(exact: ExactHasher) -> None:
    """The chain is vLLM's for the request's tokens, salt and served LoRA adapter."""
    body = {"model": "sql", "prompt": "The router sends each request to a worker."}
    tokens = exact.prompts.prompt_tokens("completions", body)
    blocks = VllmBlockHasher(4)
    result = exact.request_chain("completions", body, cache_salt="s")
    assert result.prompt_tokens == len(tokens)
    assert result.chain == blocks.chain_for(tokens, cache_salt="s", lora=("sql", "/adapters/sql"))
    base = exact.request_chain("completions", {**body, "model": "base"}, cache_salt="s")
    assert base.chain == blocks.chain_for(tokens, cache_salt="s")
    assert exact.chain("s", body["prompt"]) == base.chain


def test_unreproducible_requests_get_an_empty_chain(exact: ExactHasher) -> None:
    """Images, malformed content or prompts cost a cache hit, never the request."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    for endpoint, body in [
        ("chat", {"messages": [{"role": "user", "content": [image]}]}),
        ("chat", {"messages": "hello"}),
        ("chat", {"messages": [{"content": "no role"}]}),
        ("completions", {"prompt": {"not": "a prompt"}}),
    ]:
        assert exact.request_chain(endpoint, body, cache_salt=None).chain == ()  # type: ignore[arg-type]


def test_missing_model_directory_is_a_configuration_error(tmp_path: Path) -> None:
    """Exact mode refuses to start without local tokenizer files (it never downloads)."""
    with pytest.raises(ExactModeError, match="tokenizer_config.json"):
        ExactHasher(ExactConfig(tmp_path / "nowhere"))
