"""Chained block hashes, computed the way vLLM v1 does with its ``sha256`` hash algorithm.

A prompt is cut into blocks of ``block_size`` tokens; only full blocks get a hash. Block i's
hash is ``H((parent, tuple(tokens_i), extra_keys_i))`` where ``parent`` is block i-1's hash
(or the root for block 0), ``H(x) = sha256(pickle.dumps(x, protocol=5))`` and the root is
``H(seed)`` (vLLM seeds it from PYTHONHASHSEED). ``extra_keys`` is ``(("cache_salt", salt),)``
for block 0 of a salted request and None otherwise (vLLM 0.32 tags each extra key with its
source; older releases hashed the bare salt), so a salt changes block 0 and, through the
chain, every later block: requests with different salts never share a block.

KV events (`worker.sim.kv_publisher`) publish the low 64 bits of these digests, as vLLM does
by default (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from typing import Any

PICKLE_PROTOCOL = 5


def sha256_pickle(value: Any) -> bytes:
    """vLLM's ``sha256`` block-hash function."""
    return hashlib.sha256(pickle.dumps(value, protocol=PICKLE_PROTOCOL)).digest()


def low64(block_hash: bytes) -> int:
    """The 64-bit integer form used on the KV-event wire."""
    return int.from_bytes(block_hash, "big") & ((1 << 64) - 1)


class BlockHasher:
    """Computes the chain of full-block hashes for token sequences."""

    __slots__ = ("block_size", "root")

    def __init__(self, block_size: int, seed: str) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.root = sha256_pickle(seed)

    def hash_block(
        self, parent: bytes | None, tokens: Sequence[int], salt: str | None, index: int
    ) -> bytes:
        """Hash of block ``index`` holding ``tokens``, chained on ``parent``."""
        extra = (("cache_salt", salt),) if (index == 0 and salt) else None
        return sha256_pickle((parent if parent is not None else self.root, tuple(tokens), extra))

    def extend(self, hashes: list[bytes], tokens: Sequence[int], salt: str | None) -> list[bytes]:
        """Append to ``hashes`` the hashes of every full block of ``tokens`` not yet hashed.

        ``hashes`` must hold the hashes of the first ``len(hashes)`` blocks of ``tokens``.
        Returns the newly computed hashes (also appended in place).
        """
        size = self.block_size
        start = len(hashes)
        new: list[bytes] = []
        parent = hashes[-1] if hashes else None
        for index in range(start, len(tokens) // size):
            parent = self.hash_block(parent, tokens[index * size : (index + 1) * size], salt, index)
            new.append(parent)
        hashes.extend(new)
        return new

    def chain(self, tokens: Sequence[int], salt: str | None = None) -> list[bytes]:
        """Hashes of every full block of ``tokens``."""
        hashes: list[bytes] = []
        self.extend(hashes, tokens, salt)
        return hashes
