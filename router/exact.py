"""Exact mode's edge: turn an OpenAI request into the token ids vLLM will see, then hash them.

``routing.hasher: vllm`` routes on vLLM's own block hashes (`router.core.vllm_hash`), so the
router must produce the very token ids vLLM's OpenAI server produces for a request. This module
loads the model's tokenizer and chat template from a *local* directory (nothing is downloaded:
``local_files_only``, no remote code) and repeats what vLLM 0.32 does:

- ``/v1/chat/completions``: messages become a "conversation" (text parts joined with ``\\n``
  for templates that take a string, kept as ``{"type": "text"}`` parts for templates that loop
  over content; assistant ``tool_calls`` arguments parsed from JSON; ``developer`` messages
  turned into ``system`` ones for templates that do not know the role), tools normalised as
  vLLM's pydantic models dump them, then the template is rendered to text with
  ``add_generation_prompt`` (default true), ``continue_final_message``, ``documents`` and the
  request's ``chat_template_kwargs``; the text is tokenized with ``add_special_tokens`` false
  by default (the template writes BOS itself).
- ``/v1/completions``: a string prompt is tokenized with ``add_special_tokens`` (default
  true: the tokenizer adds BOS); token ids are used as they are; for a batch, the first prompt.

Requests it cannot reproduce (images, audio, a template error) get an empty chain: the router
then routes them by load, never fails them. transformers is imported only when exact mode is
configured (extra ``prefix-router[exact]``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from router.core.model import BlockHash
from router.core.vllm_hash import DEFAULT_HASH_ALGO, DEFAULT_SEED, HashAlgo, VllmBlockHasher

ContentFormat = Literal["auto", "string", "openai"]
Endpoint = Literal["chat", "completions"]

_TEXT_PART_KEYS = {"text": "text", "input_text": "text", "output_text": "text"}
_TEXT_PART_KEYS.update({"refusal": "refusal", "thinking": "thinking"})
_BILLING_HEADER = "x-anthropic-billing-header"
"""vLLM drops a system text line starting with this (its value changes on every request)."""


class ExactModeError(RuntimeError):
    """The model directory cannot serve exact mode (missing, no tokenizer, no template)."""


class UnsupportedPrompt(ValueError):
    """The request holds something exact mode cannot reproduce (media, malformed content)."""


@dataclass(frozen=True, slots=True)
class ExactConfig:
    """Settings of exact mode; every value must equal the vLLM workers' own."""

    model_dir: Path
    """Local directory with the tokenizer files (the same the workers load)."""
    block_size: int = 16
    """vLLM's ``--block-size`` (16 on GPUs by default; a multiple of 32 on CPUs)."""
    hash_algo: HashAlgo = DEFAULT_HASH_ALGO
    """vLLM's ``--prefix-caching-hash-algo``."""
    hash_seed: str = DEFAULT_SEED
    """The workers' PYTHONHASHSEED, or ``vllm-none-hash`` when they run without it."""
    chat_template: str | None = None
    """vLLM's ``--chat-template`` (a file path or the template itself), if the workers use one."""
    content_format: ContentFormat = "auto"
    """vLLM's ``--chat-template-content-format``."""
    lora_adapters: Mapping[str, str] = field(default_factory=dict)
    """Served LoRA name -> adapter path, as given to vLLM's ``--lora-modules``."""


def _is_access(node: Any, names: set[str], key: str | None = None) -> bool:
    """``node`` reads one of ``names`` (``x``, ``x[1:]``, ``x|f``), or its ``key`` item."""
    import jinja2.nodes as nodes

    while isinstance(node, nodes.Filter | nodes.Test) or (
        isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice)
    ):
        node = node.node
    if key is None:
        return isinstance(node, nodes.Name) and node.name in names
    if isinstance(node, nodes.Getattr):
        return node.attr == key and _is_access(node.node, names)
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
        return node.arg.value == key and _is_access(node.node, names)
    return False


def detect_content_format(template: str) -> Literal["string", "openai"]:
    """``openai`` when the template loops over a message's content parts, else ``string``.

    The same question vLLM's auto-detection answers, by a simpler walk of the template's
    syntax tree: aliases of ``messages`` assigned with ``set``, loops over them, and loops over
    ``<message>.content`` or a top-level ``content`` variable.
    """
    import jinja2
    import jinja2.nodes as nodes

    try:
        tree = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError:
        return "string"
    lists = {"messages"}
    for assign in tree.find_all(nodes.Assign):
        if isinstance(assign.target, nodes.Name) and _is_access(assign.node, lists):
            lists.add(assign.target.name)
    loops = list(tree.find_all(nodes.For))
    message_vars = {
        loop.target.name
        for loop in loops
        if isinstance(loop.target, nodes.Name) and _is_access(loop.iter, lists)
    }
    in_macros = {
        id(loop) for macro in tree.find_all(nodes.Macro) for loop in macro.find_all(nodes.For)
    }
    for loop in loops:
        if message_vars and _is_access(loop.iter, message_vars, "content"):
            return "openai"
        if id(loop) not in in_macros and _is_access(loop.iter, {"content"}):
            return "openai"
    return "string"


def _text_parts(role: str, content: Any) -> list[str]:
    if content is None:
        return []
    parts = [content] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise UnsupportedPrompt("message content must be a string or a list of parts")
    texts: list[str] = []
    for part in parts:
        if isinstance(part, str):
            text: Any = part
        elif isinstance(part, dict):
            kind = part.get("type", "text")
            if kind not in _TEXT_PART_KEYS:
                raise UnsupportedPrompt(f"content part {kind!r} is not text")
            text = part.get(_TEXT_PART_KEYS[kind])
            if text is None:
                continue  # vLLM skips empty parts
        else:
            raise UnsupportedPrompt("content parts must be objects or strings")
        if not isinstance(text, str):
            raise UnsupportedPrompt("text parts must hold strings")
        if role == "system" and text.startswith(_BILLING_HEADER):
            text = text.partition("\n")[2]
            if not text:
                continue
        texts.append(text)
    return texts


def _tool_calls(calls: Any) -> list[Any] | None:
    if not isinstance(calls, list) or not calls:
        return None
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise UnsupportedPrompt("tool_calls entries must be function calls")
        given = call["function"]
        arguments = given.get("arguments")
        if not arguments:
            arguments = {}
        elif isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = {}
            if not isinstance(arguments, dict):
                arguments = {}
        # vLLM validates messages into OpenAI's typed dicts, which keeps only their keys, in
        # their declared order: templates that print calls with ``tojson`` see that order.
        function = {"arguments": arguments, "name": given.get("name")}
        ordered = (("id", call.get("id")), ("function", function), ("type", call.get("type")))
        out.append({key: value for key, value in ordered if value is not None})
    return out


def conversation(
    messages: Sequence[Any], content_format: Literal["string", "openai"], template: str
) -> list[dict[str, Any]]:
    """The conversation vLLM passes to the chat template for these OpenAI messages."""
    result: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise UnsupportedPrompt("each message must be an object with a role")
        role = message["role"]
        texts = _text_parts(role, message.get("content"))
        turn: dict[str, Any] = {"role": role}
        if content_format == "openai":
            turn["content"] = [{"type": "text", "text": text} for text in texts]
        else:
            turn["content"] = "\n".join(texts)
        if role == "assistant":
            calls = _tool_calls(message.get("tool_calls"))
            if calls is not None:
                turn["tool_calls"] = calls
            if message.get("reasoning") is not None:
                turn["reasoning"] = turn["reasoning_content"] = message["reasoning"]
        elif role == "tool":
            if "tool_call_id" in message:
                turn["tool_call_id"] = message["tool_call_id"]
            if isinstance(turn["content"], list):
                turn["content"] = "\n".join(texts)
        if isinstance(message.get("name"), str):
            turn["name"] = message["name"]
        if role == "developer":
            turn["tools"] = message.get("tools")
        result.append(turn)
    if any(t["role"] == "developer" for t in result) and not (
        '"developer"' in template or "'developer'" in template
    ):
        result = _developer_as_system(result)
    return result


def _developer_as_system(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    converted = []
    for turn in turns:
        if turn["role"] == "developer":
            turn = {k: v for k, v in turn.items() if k != "tools"} | {"role": "system"}
        converted.append(turn)
    systems = [i for i, turn in enumerate(converted) if turn["role"] == "system"]
    if systems in ([], [0]):
        return converted
    contents = []
    for index in systems:
        content = converted[index].get("content", "")
        if isinstance(content, list):
            content = "\n".join(p["text"] for p in content if isinstance(p, dict) and "text" in p)
        if content:
            contents.append(content)
    rest = [turn for turn in converted if turn["role"] != "system"]
    return [{"role": "system", "content": "\n\n".join(contents)}, *rest]


def normalise_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Tools as vLLM hands them to the template (its pydantic models' ``model_dump``)."""
    if not isinstance(tools, list):
        return None
    out = []
    for tool in tools:
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise UnsupportedPrompt("tools must be function tools")
        given = tool["function"]
        defer = tool.get("defer_loading")
        function: dict[str, Any] = {
            "name": given.get("name"),
            "description": given.get("description"),
            "parameters": given.get("parameters"),
        }
        if given.get("strict") is not None:
            function["strict"] = given["strict"]
        function_defer = given.get("defer_loading")
        if function_defer is None:
            function_defer = defer  # vLLM copies the tool's flag into the function
        if function_defer is not None:
            function["defer_loading"] = function_defer
        dumped: dict[str, Any] = {"type": "function", "function": function}
        if defer is not None:
            dumped["defer_loading"] = defer
        out.append(dumped)
    return out


class VllmPrompts:
    """The model's tokenizer and chat template, loaded from a local directory."""

    def __init__(
        self,
        model_dir: Path,
        *,
        chat_template: str | None = None,
        content_format: ContentFormat = "auto",
    ) -> None:
        if not (model_dir / "tokenizer_config.json").is_file():
            raise ExactModeError(f"{model_dir}: no tokenizer_config.json (a local model dir)")
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise ExactModeError(
                "exact mode needs transformers: pip install 'prefix-router[exact]'"
            ) from exc
        try:
            # Any: transformers' own annotations are narrower than what its methods accept.
            self.tokenizer: Any = AutoTokenizer.from_pretrained(
                str(model_dir), local_files_only=True, trust_remote_code=False
            )
        except (OSError, ValueError) as exc:
            raise ExactModeError(f"{model_dir}: cannot load the tokenizer: {exc}") from exc
        if chat_template is not None and Path(chat_template).is_file():
            chat_template = Path(chat_template).read_text(encoding="utf-8")
        self.chat_template = chat_template
        self.content_format = content_format
        self._formats: dict[str, Literal["string", "openai"]] = {}

    def _template(self, tools: list[dict[str, Any]] | None) -> str:
        try:
            template: str = self.tokenizer.get_chat_template(self.chat_template, tools=tools)
        except ValueError as exc:
            raise UnsupportedPrompt(f"no chat template: {exc}") from exc
        return template

    def _format(self, template: str) -> Literal["string", "openai"]:
        if self.content_format != "auto":
            return self.content_format
        found = self._formats.get(template)
        if found is None:
            found = self._formats[template] = detect_content_format(template)
        return found

    def chat_text(self, body: Mapping[str, Any]) -> str:
        """The rendered chat prompt, as vLLM renders it."""
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise UnsupportedPrompt("messages must be a list")
        tools = normalise_tools(body.get("tools"))
        template = self._template(tools)
        turns = conversation(messages, self._format(template), template)
        kwargs: dict[str, Any] = dict(body.get("chat_template_kwargs") or {})
        kwargs.update(
            add_generation_prompt=body.get("add_generation_prompt", True),
            continue_final_message=body.get("continue_final_message", False),
            documents=body.get("documents"),
        )
        reasoning_effort = body.get("reasoning_effort")
        if reasoning_effort is not None:
            kwargs["reasoning_effort"] = reasoning_effort
            kwargs.setdefault("enable_thinking", reasoning_effort != "none")
        for reserved in ("tokenize", "chat_template", "return_dict"):
            kwargs.pop(reserved, None)
        try:
            text = self.tokenizer.apply_chat_template(
                turns, tools=tools, chat_template=template, tokenize=False, **kwargs
            )
        except Exception as exc:  # a template raising on odd input is vLLM's 400 too
            raise UnsupportedPrompt(f"chat template failed: {exc}") from exc
        if not isinstance(text, str):
            raise UnsupportedPrompt("chat template did not render text")
        return text

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        # verbose=False: no "longer than model_max_length" log line; vLLM checks lengths itself.
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)[
            "input_ids"
        ]
        return [int(token) for token in ids]

    def chat_tokens(self, body: Mapping[str, Any]) -> list[int]:
        return self.encode(
            self.chat_text(body), add_special_tokens=bool(body.get("add_special_tokens", False))
        )

    def completion_tokens(self, body: Mapping[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch is routed as one request: by its first prompt
        if isinstance(prompt, str):
            return self.encode(
                prompt, add_special_tokens=bool(body.get("add_special_tokens", True))
            )
        if isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            return [int(t) for t in prompt]
        raise UnsupportedPrompt("prompt must be a string or token ids")

    def prompt_tokens(self, endpoint: Endpoint, body: Mapping[str, Any]) -> list[int]:
        """The prompt token ids vLLM computes for ``body`` (raises `UnsupportedPrompt`)."""
        if endpoint == "chat":
            return self.chat_tokens(body)
        return self.completion_tokens(body)


@dataclass(frozen=True, slots=True)
class ExactChain:
    chain: tuple[BlockHash, ...]
    """vLLM's 64-bit block hashes of the prompt (full blocks), as KV events carry them."""
    prompt_tokens: int
    """Prompt length in tokens (0 when the prompt could not be reproduced)."""


class ExactHasher:
    """Exact mode for `router.routing.Router`: request -> vLLM token ids -> vLLM block hashes.

    `request_chain` is what ``Router.plan`` calls. The object is also a
    `router.core.model.Hasher` (``scope`` = cache_salt, prompt = token ids or a completion
    string), so code written against the protocol keeps working.
    """

    def __init__(self, config: ExactConfig, prompts: VllmPrompts | None = None) -> None:
        self.config = config
        self.prompts = prompts or VllmPrompts(
            config.model_dir,
            chat_template=config.chat_template,
            content_format=config.content_format,
        )
        self.blocks = VllmBlockHasher(config.block_size, config.hash_algo, config.hash_seed)

    @property
    def block_units(self) -> int:
        return self.config.block_size

    def units(self, prompt: str | Sequence[int]) -> int:
        if isinstance(prompt, str):
            return len(self.prompts.encode(prompt, add_special_tokens=True))
        return len(prompt)

    def chain(self, scope: str, prompt: str | Sequence[int]) -> tuple[BlockHash, ...]:
        tokens = (
            self.prompts.encode(prompt, add_special_tokens=True)
            if isinstance(prompt, str)
            else prompt
        )
        return self.blocks.chain_for(tokens, cache_salt=scope or None)

    def lora_for(self, model: Any) -> tuple[str, str] | None:
        """The (name, path) vLLM keys blocks with when ``model`` names a served LoRA adapter."""
        if isinstance(model, str) and model in self.config.lora_adapters:
            return (model, self.config.lora_adapters[model])
        return None

    def request_chain(
        self, endpoint: Endpoint, body: Mapping[str, Any], *, cache_salt: str | None
    ) -> ExactChain:
        """vLLM's block hashes for the request ``body`` forwarded with ``cache_salt``.

        Never raises for a request's content: what cannot be reproduced gets an empty chain.
        """
        try:
            tokens = self.prompts.prompt_tokens(endpoint, body)
        except UnsupportedPrompt:
            return ExactChain((), 0)
        chain = self.blocks.chain_for(
            tokens, cache_salt=cache_salt, lora=self.lora_for(body.get("model"))
        )
        return ExactChain(chain, len(tokens))
