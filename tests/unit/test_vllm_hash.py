"""vLLM-exact block hashes: properties, and golden values captured from real vLLM 0.32.

The golden values were computed by vLLM's own code (tests/vllm/vllm_reference.py: a real
``vllm.v1.request.Request`` with vLLM's block hasher) and, for `LIVE_*`, read from the
``BlockStored`` KV events of a running vLLM CPU server. They catch any drift in our hashing
without running vLLM; the real-vLLM tier (tests/vllm) checks them again against a new vLLM.
"""

from __future__ import annotations

import hashlib
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.core.model import Hasher
from router.core.vllm_hash import (
    DEFAULT_SEED,
    VllmBlockHasher,
    canonical_cbor,
    event_hash,
    extra_keys,
    hash_function,
    none_hash,
)

SMALL = list(range(1, 41))
WIDE = [
    84890, 39544, 103500, 12657, 18988, 140478, 24675, 95863, 15204, 133021, 56281, 9829, 22530,
    113677, 109621, 18312, 63088, 23779, 144453, 111285, 15495, 148230, 32453, 58520, 16216,
    151284, 103987, 12999, 57955, 12211, 145926, 34910, 75919, 109874, 37815, 141737, 30878,
    149661, 80866, 146868,
]  # fmt: skip
"""Token ids up to 151284: pickle needs 1-, 2- and 4-byte integer opcodes, CBOR 1 to 4 bytes."""
LORA = ("sql-adapter", "/adapters/sql")

# (algo, seed, tokens, cache_salt, lora) -> vLLM's event hashes, block size 16.
GOLDEN = [
    ("sha256", DEFAULT_SEED, SMALL, None, None, [1403909460543360175, 1643945449041937783]),
    ("sha256", DEFAULT_SEED, SMALL, "tenant-a", None, [14725353451287653808, 11679162194730534105]),
    ("sha256", "0", WIDE, None, None, [14361304959914116713, 15069086432033639657]),
    ("sha256", DEFAULT_SEED, WIDE, "tenant-a", LORA, [11484635591177138846, 9049645132815492039]),
    ("sha256_cbor", DEFAULT_SEED, WIDE, None, None, [6620013946388638733, 7412889627707785737]),
    ("sha256_cbor", "42", WIDE, "tenant-b", LORA, [14162697386479918143, 3304779870563408090]),
]  # fmt: skip

GOLDEN_ROOTS = {
    ("sha256", DEFAULT_SEED): "066b1e8987e027138e98701c46128929378935f9b6cd1549105ae6b4f0d71198",
    ("sha256", "0"): "1973e23848344dc43a988a9b478663803cfffe1243480253f9a3cf004b14aa7c",
    ("sha256_cbor", DEFAULT_SEED):
        "9bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef0",
    ("sha256_cbor", "42"): "9fa6eb003f14425eb9c8e6baacfbcaab26257357b829c7bfa74ffcc4f31c1780",
}  # fmt: skip

# Read from BlockStored events of `prefix-worker vllm` (vLLM 0.32 CPU, tiny model, block size
# 32, --hash-seed 0): a chat prompt's first 64 token ids, unsalted and with cache_salt
# "tenant-a".
LIVE_TOKENS = [
    0, 2, 87, 93, 87, 280, 81, 203, 620, 336, 261, 562, 570, 18, 659, 582, 307, 595, 18, 225,
    620, 336, 261, 562, 570, 18, 659, 582, 307, 595, 18, 225, 620, 336, 261, 562, 570, 18, 659,
    582, 307, 595, 18, 225, 620, 336, 261, 562, 570, 18, 659, 582, 307, 595, 18, 225, 3, 203, 2,
    89, 361, 86, 203, 619,
]  # fmt: skip
LIVE_UNSALTED = [16333376594762711528, 14481327882219673980]
LIVE_SALTED = [16662808545014543779, 17246982066675983971]

tokens_strategy = st.lists(st.integers(min_value=0, max_value=200_000), max_size=80)


@pytest.mark.parametrize(("algo", "seed", "tokens", "salt", "lora", "expected"), GOLDEN)
def test_hashes_equal_vllms_own(
    algo: str, seed: str, tokens: list[int], salt: str | None, lora: tuple[str, str] | None,
    expected: list[int],
) -> None:  # fmt: skip
    """Block hashes equal vLLM 0.32's for each algorithm, seed, salt and LoRA adapter."""
    hasher = VllmBlockHasher(16, algo, seed)  # type: ignore[arg-type]
    assert list(hasher.chain_for(tokens, cache_salt=salt, lora=lora)) == expected


@pytest.mark.parametrize(("key", "root"), sorted(GOLDEN_ROOTS.items()))
def test_root_equals_vllms_none_hash(key: tuple[str, str], root: str) -> None:
    """The chain root is vLLM's NONE_HASH for that algorithm and seed."""
    algo, seed = key
    assert none_hash(algo, seed).hex() == root  # type: ignore[arg-type]


def test_hashes_equal_live_kv_events() -> None:
    """Hashes equal what a running vLLM published in BlockStored events, salted or not."""
    hasher = VllmBlockHasher(32, "sha256", "0")
    assert list(hasher.chain_for(LIVE_TOKENS)) == LIVE_UNSALTED
    assert list(hasher.chain_for(LIVE_TOKENS, cache_salt="tenant-a")) == LIVE_SALTED


@pytest.mark.parametrize(
    ("algo", "root", "first"),
    [
        ("xxhash", "dc45d051a0062f6dfadd06f4455350e5", 13026523858615068499),
        ("xxhash_cbor", "590402640c85269766fbb87c28a2165c", 9677549518228557627),
    ],
)
def test_xxhash_algorithms_equal_vllms(algo: str, root: str, first: int) -> None:
    """The optional xxhash algorithms match vLLM too (seed 7, block size 4, salt "s")."""
    pytest.importorskip("xxhash")
    hasher = VllmBlockHasher(4, algo, "7")  # type: ignore[arg-type]
    assert hasher.root.hex() == root
    assert hasher.chain_for([1, 2, 3, 4, 5, 6, 7, 8], cache_salt="s")[0] == first


def test_sha256_is_sha256_of_pickle_protocol_5() -> None:
    """The default algorithm hashes the pickled (parent, tokens, extra_keys) tuple."""
    value = (b"\x01" * 32, (1, 2, 3), (("cache_salt", "x"),))
    expected = hashlib.sha256(pickle.dumps(value, protocol=5)).digest()
    assert hash_function("sha256")(value) == expected


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, "00"), (23, "17"), (24, "1818"), (255, "18ff"), (256, "190100"),
        (65536, "1a00010000"), (2**32, "1b0000000100000000"), (-1, "20"), (-500, "3901f3"),
        (2**64, "c249010000000000000000"), (None, "f6"), (True, "f5"), (b"ab", "426162"),
        ("é", "62c3a9"), ((1, (2,)), "820181" "02"), ([], "80"),
    ],
)  # fmt: skip
def test_canonical_cbor_encodes_shortest_form(value: object, encoded: str) -> None:
    """Our CBOR encoder writes canonical (shortest) forms, as cbor2's canonical mode does."""
    assert canonical_cbor(value).hex() == encoded


def test_canonical_cbor_rejects_unknown_types() -> None:
    """A value CBOR cannot carry in a block key is an error, not a silent wrong hash."""
    with pytest.raises(TypeError):
        canonical_cbor(1.5)


def test_unknown_algorithm_is_rejected() -> None:
    """A misspelt hash algorithm fails at configuration time."""
    with pytest.raises(ValueError, match="unknown"):
        VllmBlockHasher(16, "md5")  # type: ignore[arg-type]


def test_only_full_blocks_are_hashed() -> None:
    """A trailing partial block gets no hash, and adding tokens to it changes no hash."""
    hasher = VllmBlockHasher(4)
    assert hasher.chain_for([1, 2, 3]) == ()
    assert hasher.chain_for([1, 2, 3, 4, 5, 6]) == hasher.chain_for([1, 2, 3, 4, 9])
    assert len(hasher.chain_for(list(range(11)))) == 2


def test_salt_enters_block_zero_only() -> None:
    """cache_salt is an extra key of block 0 only; later blocks change through the chain."""
    assert extra_keys(0, cache_salt="s") == (("cache_salt", "s"),)
    assert extra_keys(1, cache_salt="s") is None
    assert extra_keys(0, cache_salt="") is None  # vLLM ignores an empty salt
    hasher = VllmBlockHasher(4)
    tokens = list(range(12))
    plain = hasher.digests(tokens)
    salted = hasher.digests(tokens, cache_salt="s")
    assert all(a != b for a, b in zip(plain, salted, strict=True))
    second = hash_function("sha256")((salted[0], tuple(tokens[4:8]), None))
    assert salted[1] == second


def test_lora_enters_every_block_before_the_salt() -> None:
    """A LoRA adapter is keyed on every block, ahead of block 0's salt (vLLM's order)."""
    assert extra_keys(0, cache_salt="s", lora=("n", "/p")) == (
        ("lora", "n", "/p"),
        ("cache_salt", "s"),
    )
    assert extra_keys(3, cache_salt="s", lora=("n", "/p")) == (("lora", "n", "/p"),)


def test_event_hash_is_low_64_bits_big_endian() -> None:
    """KV events carry the low 64 bits of the digest read as a big-endian integer."""
    digest = bytes(range(32))
    assert event_hash(digest) == int.from_bytes(digest[-8:], "big")


def test_is_a_hasher_with_the_salt_as_scope() -> None:
    """Through the Hasher protocol, the scope is the salt and text prompts are refused."""
    hasher: Hasher = VllmBlockHasher(4)
    tokens = list(range(8))
    assert hasher.chain("", tokens) == VllmBlockHasher(4).chain_for(tokens)
    assert hasher.chain("s", tokens) == VllmBlockHasher(4).chain_for(tokens, cache_salt="s")
    assert hasher.block_units == 4
    assert hasher.units(tokens) == 8
    with pytest.raises(TypeError):
        hasher.chain("", "text")


@given(tokens_strategy, st.sampled_from(["sha256", "sha256_cbor"]))
def test_chain_is_deterministic(tokens: list[int], algo: str) -> None:
    """Two hashers with the same settings agree on every prompt."""
    a = VllmBlockHasher(8, algo)  # type: ignore[arg-type]
    b = VllmBlockHasher(8, algo)  # type: ignore[arg-type]
    assert a.chain_for(tokens) == b.chain_for(tokens)


@given(tokens_strategy, st.data())
def test_change_in_block_k_changes_every_hash_from_k(
    tokens: list[int], data: st.DataObject
) -> None:
    """Changing a token in block k changes hashes k.. and none before k."""
    size = 8
    full = len(tokens) // size
    if full == 0:
        return
    position = data.draw(st.integers(0, full * size - 1))
    changed = list(tokens)
    changed[position] += 1
    hasher = VllmBlockHasher(size)
    before, after = hasher.chain_for(tokens), hasher.chain_for(changed)
    k = position // size
    assert before[:k] == after[:k]
    assert all(x != y for x, y in zip(before[k:], after[k:], strict=True))


@given(tokens_strategy)
def test_seeds_give_disjoint_chains(tokens: list[int]) -> None:
    """Workers with different hash seeds never share a block hash."""
    a = VllmBlockHasher(8, seed="1").chain_for(tokens)
    b = VllmBlockHasher(8, seed="2").chain_for(tokens)
    assert not set(a) & set(b)
