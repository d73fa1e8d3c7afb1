"""vLLM's own prefix-cache block hashes, reproduced bit for bit (checked against vLLM 0.32).

With these, the router's chain for a request is exactly the list of hashes vLLM computes for
it, so KV events (``BlockStored.block_hashes``) and the router's warm index speak the same
keys: precise routing, no guessing.

How vLLM hashes a request's prompt token ids (v1 engine, ``--enable-prefix-caching``):

- Only *full* blocks of ``block_size`` tokens get a hash; the trailing partial block never does.
- ``digest[i] = H((parent, tuple(tokens[i*B:(i+1)*B]), extra_keys[i]))`` where ``parent`` is
  ``digest[i-1]``, or for block 0 the root ``NONE_HASH = H(seed)``.
- ``H`` is ``--prefix-caching-hash-algo``: ``sha256`` (default: SHA-256 of the pickle, protocol
  5), ``sha256_cbor`` (SHA-256 of canonical CBOR), ``xxhash`` / ``xxhash_cbor`` (XXH3-128 of the
  same serialisations; needs the optional ``xxhash`` package).
- ``seed`` is ``$PYTHONHASHSEED`` of the vLLM process when set; otherwise ``"vllm-none-hash"``
  for the sha256 algorithms and *random per process* for the xxhash ones (then no outsider can
  reproduce them: set PYTHONHASHSEED, as ``prefix-worker vllm --hash-seed`` does).
- ``extra_keys[i]`` is None, or a tuple of tagged keys in this order: ``("lora", name, path)``
  on every block of a LoRA request; ``("cache_salt", salt)`` on block 0 only when the request
  has a non-empty ``cache_salt`` (so a salt changes every block through the chain). Multimodal
  and prompt-embeds keys exist too; text-only routing never produces them.
- KV events carry ``int.from_bytes(digest, "big") & (2**64 - 1)`` (vLLM's default,
  ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``): the low 64 bits. The router's chains hold these.

The seed is always passed in: nothing here reads the environment (this module is pure).
Canonical CBOR is encoded here for the few types a block key holds (no cbor2 dependency).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence
from typing import Literal, get_args

from router.core.model import BlockHash

HashAlgo = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]
HASH_ALGOS: tuple[HashAlgo, ...] = get_args(HashAlgo)
DEFAULT_HASH_ALGO: HashAlgo = "sha256"
"""vLLM's default ``--prefix-caching-hash-algo``."""
DEFAULT_SEED = "vllm-none-hash"
"""vLLM's root seed for the sha256 algorithms when PYTHONHASHSEED is unset."""
PICKLE_PROTOCOL = 5
"""``pickle.HIGHEST_PROTOCOL`` on every Python vLLM supports (3.10 to 3.14)."""
LOW64 = (1 << 64) - 1

LoraKey = tuple[str, str]
"""A LoRA adapter as vLLM keys it: (lora_name, lora_path)."""
ExtraKeys = tuple[tuple[str, ...], ...] | None

# -- serialisations ------------------------------------------------------------------------------


def _cbor_head(major: int, value: int) -> bytes:
    """Shortest-form CBOR head (canonical): major type and argument."""
    kind = major << 5
    if value < 24:
        return bytes((kind | value,))
    if value < 1 << 8:
        return bytes((kind | 24, value))
    if value < 1 << 16:
        return bytes((kind | 25,)) + value.to_bytes(2, "big")
    if value < 1 << 32:
        return bytes((kind | 26,)) + value.to_bytes(4, "big")
    return bytes((kind | 27,)) + value.to_bytes(8, "big")


def _cbor_append(out: bytearray, value: object) -> None:
    if value is None:
        out.append(0xF6)
    elif value is True or value is False:
        out.append(0xF5 if value else 0xF4)
    elif isinstance(value, int):
        if value >= 0:
            if value > LOW64:
                _cbor_bignum(out, 2, value)
            else:
                out += _cbor_head(0, value)
        elif -value - 1 > LOW64:
            _cbor_bignum(out, 3, -value - 1)
        else:
            out += _cbor_head(1, -value - 1)
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        out += _cbor_head(2, len(data))
        out += data
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        out += _cbor_head(3, len(data))
        out += data
    elif isinstance(value, tuple | list):
        out += _cbor_head(4, len(value))
        for item in value:
            _cbor_append(out, item)
    else:
        raise TypeError(f"cannot CBOR-encode {type(value).__name__} in a block key")


def _cbor_bignum(out: bytearray, tag: int, magnitude: int) -> None:
    out += _cbor_head(6, tag)
    data = magnitude.to_bytes((magnitude.bit_length() + 7) // 8, "big")
    out += _cbor_head(2, len(data))
    out += data


def canonical_cbor(value: object) -> bytes:
    """Canonical CBOR (RFC 8949 shortest form) of None/bool/int/bytes/str/tuple/list values,
    as ``cbor2.dumps(value, canonical=True)`` encodes them."""
    out = bytearray()
    _cbor_append(out, value)
    return bytes(out)


def _pickle(value: object) -> bytes:
    return pickle.dumps(value, protocol=PICKLE_PROTOCOL)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xxh3_128(data: bytes) -> bytes:
    try:
        import xxhash  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:  # optional, as in vLLM
        raise ValueError("the xxhash hash algorithms need the 'xxhash' package") from exc
    digest: bytes = xxhash.xxh3_128_digest(data)
    return digest


def hash_function(algo: HashAlgo) -> Callable[[object], bytes]:
    """vLLM's block-hash function for ``--prefix-caching-hash-algo algo``."""
    serialise: Callable[[object], bytes]
    digest: Callable[[bytes], bytes]
    if algo == "sha256":
        serialise, digest = _pickle, _sha256
    elif algo == "sha256_cbor":
        serialise, digest = canonical_cbor, _sha256
    elif algo == "xxhash":
        serialise, digest = _pickle, _xxh3_128
    elif algo == "xxhash_cbor":
        serialise, digest = canonical_cbor, _xxh3_128
    else:
        raise ValueError(f"unknown prefix-caching hash algorithm {algo!r}; one of {HASH_ALGOS}")

    def block_hash(value: object) -> bytes:
        return digest(serialise(value))

    return block_hash


# -- the chain -----------------------------------------------------------------------------------


def none_hash(algo: HashAlgo = DEFAULT_HASH_ALGO, seed: str = DEFAULT_SEED) -> bytes:
    """vLLM's ``NONE_HASH``: the parent of block 0, ``H(seed)``."""
    return hash_function(algo)(seed)


def extra_keys(
    block_index: int, *, cache_salt: str | None = None, lora: LoraKey | None = None
) -> ExtraKeys:
    """The extra keys vLLM folds into block ``block_index`` of a text-only request."""
    keys: list[tuple[str, ...]] = []
    if lora is not None:
        keys.append(("lora", lora[0], lora[1]))
    if block_index == 0 and cache_salt:
        keys.append(("cache_salt", cache_salt))
    return tuple(keys) if keys else None


def event_hash(digest: bytes) -> BlockHash:
    """The value a KV event carries for ``digest`` (vLLM's integer block hashes: low 64 bits)."""
    return int.from_bytes(digest, "big") & LOW64


class VllmBlockHasher:
    """Computes vLLM's block hashes for prompt token ids.

    Also a `router.core.model.Hasher`: ``chain(scope, tokens)`` treats ``scope`` as the
    request's ``cache_salt`` ("" for none), because in exact mode the tenant reaches vLLM
    only through the salt the router sets.
    """

    __slots__ = ("_hash", "algo", "block_size", "root", "seed")

    def __init__(
        self, block_size: int, algo: HashAlgo = DEFAULT_HASH_ALGO, seed: str = DEFAULT_SEED
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.algo = algo
        self.seed = seed
        self._hash = hash_function(algo)
        self.root = self._hash(seed)

    @property
    def block_units(self) -> int:
        return self.block_size

    def units(self, prompt: str | Sequence[int]) -> int:
        return len(prompt)

    def digests(
        self,
        tokens: Sequence[int],
        *,
        cache_salt: str | None = None,
        lora: LoraKey | None = None,
    ) -> list[bytes]:
        """Full digests of every full block of ``tokens``, in order."""
        size = self.block_size
        block_hash = self._hash
        parent = self.root
        out: list[bytes] = []
        for index in range(len(tokens) // size):
            block = tuple(tokens[index * size : (index + 1) * size])
            parent = block_hash(
                (parent, block, extra_keys(index, cache_salt=cache_salt, lora=lora))
            )
            out.append(parent)
        return out

    def chain_for(
        self,
        tokens: Sequence[int],
        *,
        cache_salt: str | None = None,
        lora: LoraKey | None = None,
    ) -> tuple[BlockHash, ...]:
        """The 64-bit hashes KV events report for ``tokens`` (full blocks only)."""
        return tuple(event_hash(d) for d in self.digests(tokens, cache_salt=cache_salt, lora=lora))

    def chain(self, scope: str, prompt: str | Sequence[int]) -> tuple[BlockHash, ...]:
        """`Hasher` protocol: ``scope`` is the cache_salt, ``prompt`` token ids."""
        if isinstance(prompt, str):
            raise TypeError("the vLLM hasher needs token ids; tokenize with router.exact first")
        return self.chain_for(prompt, cache_salt=scope or None)
