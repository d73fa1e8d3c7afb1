"""The worker endpoints that peer routers call, so they can run in front of simulators.

The load tests compare our router with ``sglang-router`` and ``vllm-router`` (PyPI). Both
call more on a worker than the inference endpoints:

- ``sglang-router`` registers a worker by reading ``GET /server_info`` and ``GET
  /model_info`` (falling back to ``/get_server_info`` and ``/get_model_info`` on 404) and
  turns some fields into worker labels. The answers here name the served model and say the
  worker generates text, but carry no ``model_path`` or ``tokenizer_path``: with either, the
  router tries to fetch a tokenizer from a model hub.
- ``vllm-router``'s cache-aware policy asks every request's prompt ids from a worker: ``POST
  /v1/chat/completions/render`` or ``/v1/completions/render`` (vLLM's render API, whose
  answer is a ``GenerateRequest``: ``token_ids``, ``sampling_params``, ``request_id``...),
  then ``POST /tokenize`` (vLLM's ``TokenizeResponse``: ``count``, ``max_model_len``,
  ``tokens``). ``POST /detokenize`` is served too.

Prompt ids come from the simulator's own chat template and tokenizer, through the same
parsing as the inference endpoints, so the ids a peer sees are the ids the cache holds, with
one exception: a prompt whose UTF-8 length is not a multiple of 4 ends in a "tail" token
whose simulator id is at least 2**32 (see `tokenizer`). Real vocabularies fit in 32 bits and
vllm-router drops ids that do not ("invalid_token_ids", then it routes without a prefix), so
these endpoints show that last token as its bytes zero-padded to 4 (a full-piece id no text
without NUL bytes produces). Every other id, and the count, is the simulator's own. The
handlers read only the `SimConfig`; they share no state with inference.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from worker.sim.config import SimConfig
from worker.sim.protocol import (
    ApiError,
    Kind,
    ParsedRequest,
    decode_body,
    invalid,
    parse_request,
)
from worker.sim.tokenizer import TAIL_BASE, decode, encode, render_chat

_Handler = Callable[[web.Request], Awaitable[web.Response]]

MODEL_TYPE = "prefix-sim"
ARCHITECTURE = "PrefixSimForCausalLM"
MAX_TOKEN_ID = (1 << 63) - 1


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(data), status=status, content_type="application/json"
    )


def _error(err: ApiError) -> web.Response:
    return web.Response(body=err.body(), status=err.status, content_type="application/json")


class PeerApi:
    """Handlers for the peer-router endpoints of one simulated worker."""

    def __init__(self, config: SimConfig, *, version: str) -> None:
        self._config = config
        self._version = version

    def register(self, app: web.Application) -> None:
        """Add every peer endpoint to ``app``."""
        for path in ("/server_info", "/get_server_info"):
            app.router.add_get(path, self.server_info)
        for path in ("/model_info", "/get_model_info"):
            app.router.add_get(path, self.model_info)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_post("/v1/chat/completions/render", self._render("chat"))
        app.router.add_post("/v1/completions/render", self._render("completion"))

    # ---- sglang-router ------------------------------------------------------------------

    async def server_info(self, request: web.Request) -> web.Response:
        """What sglang-router reads when it registers a worker (no model path: see above)."""
        config = self._config
        return _json(
            {
                "served_model_name": config.model,
                "tp_size": 1,
                "dp_size": 1,
                "context_length": config.effective_max_model_len,
                "max_total_num_tokens": config.cache_blocks * config.block_size,
                "max_running_requests": config.max_running,
                "page_size": config.block_size,
                "version": self._version,
            }
        )

    async def model_info(self, request: web.Request) -> web.Response:
        return _json(
            {
                "is_generation": True,
                "model_type": MODEL_TYPE,
                "architectures": [ARCHITECTURE],
            }
        )

    # ---- vLLM's tokenizer and render APIs (vllm-router) --------------------------------

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``POST /tokenize`` for a chat (``messages``) or a text (``prompt``)."""
        try:
            body = decode_body(await request.read())
            self._check_model(body)
            ids = peer_ids(_tokenize_chat(body) if "messages" in body else _tokenize_text(body))
            with_strs = _opt_bool(body, "return_token_strs", False)
        except ApiError as err:
            return _error(err)
        return _json(
            {
                "count": len(ids),
                "max_model_len": self._config.effective_max_model_len,
                "tokens": ids,
                "token_strs": [decode([token]) for token in ids] if with_strs else None,
            }
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``POST /detokenize``: the text of ``tokens``."""
        try:
            body = decode_body(await request.read())
            self._check_model(body)
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(_is_token(t) for t in tokens):
                raise invalid("'tokens' must be a list of token ids.", "tokens")
        except ApiError as err:
            return _error(err)
        return _json({"prompt": decode(tokens)})

    def _render(self, kind: Kind) -> _Handler:
        async def handler(request: web.Request) -> web.Response:
            try:
                body = decode_body(await request.read())
                parsed = parse_request(
                    kind,
                    body,
                    served_model=self._config.model,
                    max_model_len=self._config.effective_max_model_len,
                )
            except ApiError as err:
                return _error(err)
            prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
            base = request.headers.get("x-request-id") or uuid.uuid4().hex
            rendered = self._generate_request(prefix + base, body, parsed)
            # vLLM answers a completions render with one GenerateRequest per prompt.
            return _json(rendered if kind == "chat" else [rendered])

        return handler

    def _generate_request(
        self, request_id: str, body: dict[str, Any], parsed: ParsedRequest
    ) -> dict[str, Any]:
        """vLLM's ``GenerateRequest`` for a parsed request (the fields a router reads)."""
        sampling: dict[str, Any] = {"max_tokens": parsed.max_tokens, "n": 1}
        for key in ("temperature", "top_p", "seed"):
            value = body.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                sampling[key] = value
        return {
            "request_id": request_id,
            "token_ids": peer_ids(parsed.prompt_ids),
            "features": None,
            "sampling_params": sampling,
            "model": body.get("model") or self._config.model,
            "stream": parsed.stream,
            "stream_options": body.get("stream_options") if parsed.stream else None,
            "cache_salt": parsed.cache_salt,
            "priority": 0,
        }

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != self._config.model:
            raise ApiError(
                f"The model `{model}` does not exist.", status=404, err_type="NotFoundError"
            )


def peer_ids(ids: list[int]) -> list[int]:
    """``ids`` as shown to peers: a final tail token becomes its zero-padded 4-byte piece."""
    if ids and ids[-1] >= TAIL_BASE:
        return [*ids[:-1], ids[-1] & 0xFFFFFF]
    return ids


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_ID


def _opt_bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"'{key}' must be a boolean.", key)
    return value


def _tokenize_text(body: dict[str, Any]) -> list[int]:
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise invalid("'prompt' (a string) or 'messages' is required.", "prompt")
    return encode(prompt)


def _tokenize_chat(body: dict[str, Any]) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
    ):
        raise invalid("'messages' must be a list of objects with a string 'role'.", "messages")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise invalid("'tools' must be a list.", "tools")
    if body.get("continue_final_message") is True and body.get("add_generation_prompt") is True:
        # vLLM refuses the pair when both are given.
        raise invalid(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
        )
    add_generation_prompt = _opt_bool(body, "add_generation_prompt", True)
    return encode(render_chat(messages, tools, add_generation_prompt=add_generation_prompt))
