"""Prompt -> fixed-size blocks -> chained, tenant-scoped 64-bit hashes.

vLLM's prefix cache reuses a block only when every block before it is identical too, so the
router hashes prompts the same way: ``h[i] = H(h[i-1], block[i])``. A change in block k changes
every hash from k on and none before it, and the warm index can answer "how many leading blocks
of this chain are warm on worker w" by looking up hashes, never by comparing text.

The chain is rooted in a *scope* (tenant, model, LoRA adapter; see `scope_key`): the root is
the hash of the scope, so two tenants sending identical text get disjoint chains and one
tenant's warm entries can never attract (or reveal) another's traffic.

`ApproxHasher` needs no model files: it cuts rendered text into ``block_chars`` characters
(about 16 tokens at the default 64) and token-id prompts into ``block_chars // 4`` tokens.
H is 128-bit MurmurHash3 (x64) of ``parent (8 bytes, little-endian) + block bytes``, keeping
the low 64 bits. The exact vLLM hasher (tokenizer + vLLM's own block hashes, so chains match
KV events) is a separate class behind the same `router.core.model.Hasher` protocol.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import mmh3

from router.core.model import BlockHash

# A domain tag keeps prompt_cache_key hashes apart from chain roots of the same bytes.
_CACHE_KEY_TAG = b"prefix-router/prompt_cache_key\x00"

_hash128 = mmh3.mmh3_x64_128_utupledigest
"""(bytes) -> (low64, high64) of MurmurHash3 x64 128, unsigned; the fastest mmh3 entry point."""


def _low64(data: bytes) -> int:
    low: int = _hash128(data, 0)[0]
    return low


def scope_key(tenant: str, model: str, lora: str | None = None) -> str:
    """Unambiguous encoding of a hashing scope (tenant, model, LoRA adapter).

    Each part is length-prefixed, so no choice of separators inside the names can make two
    different triples encode alike (``("a\\x1fb", "c")`` != ``("a", "b\\x1fc")``). ``lora=None``
    (base model) and ``lora=""`` are distinct scopes.
    """
    lora_part = "-" if lora is None else f"{len(lora)}:{lora}"
    return f"t{len(tenant)}:{tenant}m{len(model)}:{model}l{lora_part}"


def scope_root(scope: str) -> BlockHash:
    """The chain root of ``scope``: the parent hash of block 0."""
    return _low64(scope.encode("utf-8", "surrogatepass"))


def affinity_key(chain: Sequence[BlockHash], affinity_blocks: int) -> BlockHash | None:
    """The chain hash at depth ``min(len(chain), affinity_blocks)``; None for an empty chain.

    The head of a prompt (system prompt, tools, few-shot examples) is what requests of one
    workload share, so its hash is the ring key: requests that share the head stay together
    even while their tails differ.
    """
    depth = min(len(chain), affinity_blocks)
    if depth <= 0:
        return None
    return chain[depth - 1]


def cache_key_affinity(scope: str, prompt_cache_key: str) -> BlockHash:
    """Ring key for OpenAI's ``prompt_cache_key``, confined to ``scope`` (the tenant's).

    The scope is length-prefixed so (scope, key) pairs never collide by concatenation.
    """
    scope_bytes = scope.encode("utf-8", "surrogatepass")
    key_bytes = prompt_cache_key.encode("utf-8", "surrogatepass")
    return _low64(_CACHE_KEY_TAG + len(scope_bytes).to_bytes(4, "little") + scope_bytes + key_bytes)


class ApproxHasher:
    """Approximate block hasher: fixed-size character (or token-id) blocks, mmh3 chain.

    Only full blocks count: the trailing partial block is still being written by the
    conversation and vLLM does not cache partial blocks either.
    """

    __slots__ = ("block_chars", "token_block")

    def __init__(self, block_chars: int = 64) -> None:
        if block_chars < 1:
            raise ValueError(f"block_chars must be >= 1, got {block_chars}")
        self.block_chars = block_chars
        self.token_block = max(1, block_chars // 4)
        """Tokens per block for token-id prompts (a token is about four characters)."""

    @property
    def block_units(self) -> int:
        """Characters per block for text prompts (token prompts use `token_block`)."""
        return self.block_chars

    def units(self, prompt: str | Sequence[int]) -> int:
        """Length of ``prompt`` in characters (text) or tokens (token ids)."""
        return len(prompt)

    def chain(self, scope: str, prompt: str | Sequence[int]) -> tuple[BlockHash, ...]:
        """Chained hashes of the full blocks of ``prompt``, rooted in ``scope``."""
        if isinstance(prompt, str):
            return self._text_chain(scope_root(scope), prompt)
        return self._token_chain(scope_root(scope), prompt)

    def _text_chain(self, parent: int, text: str) -> tuple[BlockHash, ...]:
        size = self.block_chars
        end = len(text) - len(text) % size
        hashes: list[int] = []
        append = hashes.append
        hash128 = _hash128
        if text.isascii():
            # One encode for the whole prompt: for ASCII, byte offsets equal char offsets,
            # and the hashes are identical to the per-block path below.
            data = text.encode("ascii")
            for start in range(0, end, size):
                parent = hash128(parent.to_bytes(8, "little") + data[start : start + size], 0)[0]
                append(parent)
        else:
            for start in range(0, end, size):
                block = text[start : start + size].encode("utf-8", "surrogatepass")
                parent = hash128(parent.to_bytes(8, "little") + block, 0)[0]
                append(parent)
        return tuple(hashes)

    def _token_chain(self, parent: int, tokens: Sequence[int]) -> tuple[BlockHash, ...]:
        size = self.token_block
        end = len(tokens) - len(tokens) % size
        if end == 0:
            return ()
        try:
            data = struct.pack(f"<{end}I", *tokens[:end])
        except struct.error:
            # Ids outside uint32 are invalid for any real vocabulary; wrap rather than fail,
            # since a hash only steers routing and the worker will reject the request anyway.
            data = struct.pack(f"<{end}I", *(t & 0xFFFFFFFF for t in tokens[:end]))
        stride = 4 * size
        hashes: list[int] = []
        append = hashes.append
        hash128 = _hash128
        for start in range(0, 4 * end, stride):
            parent = hash128(parent.to_bytes(8, "little") + data[start : start + stride], 0)[0]
            append(parent)
        return tuple(hashes)
