"""Block hashing: prompts become tenant-scoped chains whose prefixes match exactly when the
prompts' leading blocks do."""

from __future__ import annotations

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.core.blocks import (
    ApproxHasher,
    affinity_key,
    cache_key_affinity,
    scope_key,
    scope_root,
)

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None)
BLOCK = 64
SCOPE = scope_key("acme", "llama-3-8b")

block_text = st.text(min_size=BLOCK, max_size=BLOCK)


def _low64(data: bytes) -> int:
    return mmh3.hash128(data, 0, True, False) & ((1 << 64) - 1)


def test_chain_matches_the_documented_construction() -> None:
    """The chain is mmh3-128 (low 64 bits) over parent bytes + block bytes, rooted in the scope."""
    text = "You are a helpful assistant. " * 5  # 145 chars: two full blocks
    chain = ApproxHasher().chain(SCOPE, text)
    parent = _low64(SCOPE.encode())
    expected = []
    for start in (0, 64):
        parent = _low64(parent.to_bytes(8, "little") + text[start : start + 64].encode())
        expected.append(parent)
    assert chain == tuple(expected)
    assert scope_root(SCOPE) == _low64(SCOPE.encode())


def test_chain_is_deterministic_across_instances() -> None:
    """Two routers hashing the same prompt get the same chain."""
    text = "x" * 1000 + "é" * 300
    assert ApproxHasher().chain(SCOPE, text) == ApproxHasher(64).chain(SCOPE, text)
    assert all(0 <= h < 2**64 for h in ApproxHasher().chain(SCOPE, text))


@PROPERTY
@given(blocks=st.lists(block_text, min_size=1, max_size=8), data=st.data())
def test_change_in_block_k_changes_every_hash_from_k_on(
    blocks: list[str], data: st.DataObject
) -> None:
    """Editing block k keeps hashes before k and changes every hash from k on."""
    k = data.draw(st.integers(0, len(blocks) - 1))
    replacement = data.draw(block_text.filter(lambda b: b != blocks[k]))
    edited = [*blocks[:k], replacement, *blocks[k + 1 :]]
    hasher = ApproxHasher()
    before = hasher.chain(SCOPE, "".join(blocks))
    after = hasher.chain(SCOPE, "".join(edited))
    assert len(before) == len(after) == len(blocks)
    assert before[:k] == after[:k]
    assert all(b != a for b, a in zip(before[k:], after[k:], strict=True))


@settings(PROPERTY, max_examples=30)
@given(
    text=st.text(min_size=BLOCK, max_size=3 * BLOCK),
    tenant_a=st.text(max_size=8),
    tenant_b=st.text(max_size=8),
)
def test_different_scopes_never_share_a_hash(text: str, tenant_a: str, tenant_b: str) -> None:
    """Two tenants sending the same text get disjoint chains."""
    if tenant_a == tenant_b:
        tenant_b += "-other"
    hasher = ApproxHasher()
    chain_a = hasher.chain(scope_key(tenant_a, "m"), text)
    chain_b = hasher.chain(scope_key(tenant_b, "m"), text)
    assert chain_a
    assert not set(chain_a) & set(chain_b)


def test_model_and_lora_are_part_of_the_scope() -> None:
    """The same tenant on another model or adapter does not share warm blocks."""
    hasher = ApproxHasher()
    text = "a" * 256
    chains = {
        hasher.chain(scope_key("t", "m"), text),
        hasher.chain(scope_key("t", "m2"), text),
        hasher.chain(scope_key("t", "m", "adapter"), text),
        hasher.chain(scope_key("t", "m", ""), text),
    }
    assert len(chains) == 4


@PROPERTY
@given(text=st.text(max_size=5 * BLOCK), tail=st.text(max_size=BLOCK - 1))
def test_partial_last_block_does_not_count(text: str, tail: str) -> None:
    """Only full blocks are hashed, so an unfinished tail changes nothing."""
    hasher = ApproxHasher()
    full = text[: len(text) - len(text) % BLOCK]
    chain = hasher.chain(SCOPE, full)
    assert len(chain) == len(full) // BLOCK
    assert hasher.chain(SCOPE, full + tail) == chain


def test_non_ascii_blocks_are_counted_in_characters() -> None:
    """A block is 64 characters whatever their UTF-8 width, and ASCII heads still match."""
    hasher = ApproxHasher()
    head = "h" * 128
    assert len(hasher.chain(SCOPE, "€" * 128)) == 2
    assert hasher.chain(SCOPE, head + "€" * 64)[:2] == hasher.chain(SCOPE, head)
    # A lone surrogate (valid in parsed JSON) must not break hashing.
    assert len(hasher.chain(SCOPE, "\ud800" * 64)) == 1


def test_token_prompts_use_quarter_size_blocks() -> None:
    """Token-id prompts are cut into block_chars // 4 tokens; only full blocks count."""
    hasher = ApproxHasher(64)
    assert hasher.token_block == 16
    tokens = list(range(50))
    chain = hasher.chain(SCOPE, tokens)
    assert len(chain) == 3
    assert hasher.chain(SCOPE, tokens[:48]) == chain
    assert ApproxHasher(2).token_block == 1
    assert hasher.units(tokens) == 50
    assert hasher.units("abc") == 3
    assert hasher.block_units == 64


@PROPERTY
@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), min_size=16, max_size=96),
    data=st.data(),
)
def test_token_change_in_block_k_changes_every_hash_from_k_on(
    tokens: list[int], data: st.DataObject
) -> None:
    """Editing one token id changes that block's hash and all later ones, nothing before."""
    hasher = ApproxHasher()
    n_blocks = len(tokens) // 16
    position = data.draw(st.integers(0, n_blocks * 16 - 1))
    edited = list(tokens)
    edited[position] = (tokens[position] + 1) % 2**32
    k = position // 16
    before, after = hasher.chain(SCOPE, tokens), hasher.chain(SCOPE, edited)
    assert before[:k] == after[:k]
    assert all(b != a for b, a in zip(before[k:], after[k:], strict=True))


def test_out_of_range_token_ids_do_not_raise() -> None:
    """Ids outside uint32 (invalid for any vocabulary) still hash instead of failing."""
    assert len(ApproxHasher().chain(SCOPE, [2**40, -1] * 8)) == 1


def test_block_chars_must_be_positive() -> None:
    """A zero block size is a configuration error, reported at construction."""
    with pytest.raises(ValueError, match="block_chars"):
        ApproxHasher(0)


# Names built from the characters the encoding itself uses, so collisions are easy to hit.
tricky_names = st.text(alphabet="a:|/\x00\x1f-1l", max_size=4)
scope_triples = st.tuples(tricky_names, tricky_names, st.none() | tricky_names)


@PROPERTY
@given(a=scope_triples, b=scope_triples)
def test_scope_key_is_unambiguous(
    a: tuple[str, str, str | None], b: tuple[str, str, str | None]
) -> None:
    """Different (tenant, model, lora) triples never encode to the same scope."""
    assert (scope_key(*a) == scope_key(*b)) == (a == b)


@PROPERTY
@given(text=tricky_names, data=st.data())
def test_scope_key_does_not_depend_on_where_names_split(text: str, data: st.DataObject) -> None:
    """Moving characters from the tenant into the model (or adapter) changes the scope."""
    cuts = st.tuples(st.integers(0, len(text)), st.integers(0, len(text))).map(sorted)
    i, j = data.draw(cuts)
    k, m = data.draw(cuts)
    first = (text[:i], text[i:j], text[j:])
    second = (text[:k], text[k:m], text[m:])
    assert (scope_key(*first) == scope_key(*second)) == (first == second)


def test_scope_key_resists_separator_tricks() -> None:
    """Moving a separator character between tenant and model changes the scope."""
    assert scope_key("a\x1fb", "c") != scope_key("a", "b\x1fc")
    assert scope_key("a:1", "b") != scope_key("a", ":1b")
    assert scope_key("a:", "b") != scope_key("a", ":b")
    assert len({scope_key("t", "m", lora) for lora in (None, "", "None", "-")}) == 4


def test_affinity_key_is_the_hash_at_the_affinity_depth() -> None:
    """The ring key is the chain hash at min(n, affinity_blocks); no blocks, no key."""
    chain = (11, 22, 33, 44)
    assert affinity_key(chain, 2) == 22
    assert affinity_key(chain, 8) == 44
    assert affinity_key((), 8) is None


def test_cache_key_affinity_is_tenant_scoped() -> None:
    """The same prompt_cache_key in two tenants gives two different ring keys."""
    a = cache_key_affinity(scope_key("a", "m"), "conv-1")
    assert a == cache_key_affinity(scope_key("a", "m"), "conv-1")
    assert a != cache_key_affinity(scope_key("b", "m"), "conv-1")
    assert a != cache_key_affinity(scope_key("a", "m"), "conv-2")
    assert 0 <= a < 2**64
    # Concatenation cannot forge a collision between (scope, key) pairs.
    assert cache_key_affinity("ab", "c") != cache_key_affinity("a", "bc")


def _reference_chain(scope: str, blocks: list[bytes]) -> tuple[int, ...]:
    parent = _low64(scope.encode())
    chain = []
    for block in blocks:
        parent = _low64(parent.to_bytes(8, "little") + block)
        chain.append(parent)
    return tuple(chain)


@PROPERTY
@given(text=st.text(max_size=400), block_chars=st.integers(1, 80))
def test_text_chain_equals_the_reference_loop(text: str, block_chars: int) -> None:
    """Hashes stay exactly as documented for any text and block size, ASCII or not, so the
    chains in a shared index do not change with the router's version."""
    end = len(text) - len(text) % block_chars
    blocks = [
        text[i : i + block_chars].encode("utf-8", "surrogatepass")
        for i in range(0, end, block_chars)
    ]
    assert ApproxHasher(block_chars).chain(SCOPE, text) == _reference_chain(SCOPE, blocks)


@PROPERTY
@given(tokens=st.lists(st.integers(0, 2**32 - 1), max_size=120), block_chars=st.integers(1, 80))
def test_token_chain_equals_the_reference_loop(tokens: list[int], block_chars: int) -> None:
    """Token-id chains hash each block's ids as little-endian uint32, chained as documented."""
    size = max(1, block_chars // 4)
    end = len(tokens) - len(tokens) % size
    blocks = [
        b"".join(t.to_bytes(4, "little") for t in tokens[i : i + size]) for i in range(0, end, size)
    ]
    assert ApproxHasher(block_chars).chain(SCOPE, tokens) == _reference_chain(SCOPE, blocks)
