"""Compact request shapes for the offline replay: prompts as paths through two segment tries.

The replay (`load_tests.replay`) must run a million requests over hundreds of workers, so it
never touches prompt text or per-block hashes while it runs. Each request is reduced, once,
to two *paths*: one through a trie of the router's blocks (``block_chars`` characters of the
router's rendering, scoped by tenant exactly as `router.routing` hashes), one through a trie
of the simulator's blocks (``block_size`` tokens of its chat template and tokenizer, scoped by
the tenant's cache salt). A trie node is a run of blocks shared by every request that passes
through it; two requests share exactly the blocks of their common nodes, so "how many leading
blocks of this chain does worker w hold" becomes a walk over a handful of nodes.

Two builders produce the same `ShapedTrace`:

- `shape_requests` (a recorded trace, real bodies): each prompt is rendered and hashed block by
  block exactly as the live router and the simulator do, and the chains are inserted into
  compressed tries (a node is split where a later chain diverges inside it). Exact, about
  100 us per request.
- `shape_workload` (a `WorkloadConfig`, no bodies): the real generator's structure (arrivals,
  tenants, conversations, versions, stream and length picks) with the message texts left
  out. Prompt heads are built, rendered and hashed for real (they are few: one per tenant and
  version), so heads, version cuts and the affinity keys inside them are exact; each later
  message is a node whose block count follows from its rendered length and offset, its
  length drawn from a pool of real generated messages. The approximation: two different
  messages are assumed to share no bytes, where in truth they share their role tag (at most
  one block at the divergence point, well under 0.1% of a prompt's blocks). About 10 us per
  request.
"""

from __future__ import annotations

import gc
import random
from array import array
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import mmh3

from load_tests.tenants import Head, assistant_reply, user_tail
from load_tests.workload import CHAT_PATH, TraceRequest, WorkloadConfig, WorkloadGenerator
from router.core.blocks import ApproxHasher, scope_key
from router.core.render import render_chat, render_completion
from worker.sim.protocol import ApiError, parse_request
from worker.sim.tokenizer import encode
from worker.sim.tokenizer import render_chat as sim_render_chat

ROOT = 0
_GEN_PROMPT = "<|assistant|>"
"""What the simulator's template appends to every chat (the generation prompt)."""
_POOL_SIZE = 4096
_UNBOUNDED_LEN = 1 << 40


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector off for a block that builds or walks millions of objects.

    Its full passes over everything allocated so far cost more than they free here (the
    shaping and the replay make no reference cycles worth collecting).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _mix(node: int, index: int) -> int:
    """A 64-bit ring key for block ``index`` of a node that has no real hashes."""
    low: int = mmh3.mmh3_x64_128_utupledigest(f"{node}/{index}".encode(), 0x5EED)[0]
    return low


class ChainTrie:
    """A compressed trie of block chains: node = a run of blocks with one parent.

    `insert` walks a chain of real hashes (splitting a node where the chain diverges inside
    it, the split-off head becoming a new parent so existing node ids keep their meaning);
    `extend` appends a new node known only by its block count (the structural mode, where
    every message is new text). Paths are read with `path` once every chain is in.

    Parents and block counts are arrays and only real nodes keep hashes: a million-request
    trace has millions of nodes, most of them synthetic.
    """

    __slots__ = ("_by_first", "blocks", "hashes", "parent")

    def __init__(self) -> None:
        self.parent: array[int] = array("i", [-1])
        self.blocks: array[int] = array("i", [0])
        self.hashes: dict[int, array[int]] = {}
        """Per real node, its blocks' chain hashes (synthetic nodes have none)."""
        self._by_first: dict[tuple[int, int], int] = {}

    def __len__(self) -> int:
        return len(self.parent)

    def _new(self, parent: int, blocks: int, hashes: array[int] | None) -> int:
        node = len(self.parent)
        self.parent.append(parent)
        self.blocks.append(blocks)
        if hashes is not None:
            self.hashes[node] = hashes
        return node

    def insert(self, chain: Sequence[int], start: int = ROOT) -> int:
        """The node where ``chain`` (real hashes, rooted at ``start``) ends; creates what is new."""
        node = start
        pos = 0
        total = len(chain)
        by_first = self._by_first
        while pos < total:
            child = by_first.get((node, chain[pos]))
            if child is None:
                rest = array("Q", chain[pos:])
                leaf = self._new(node, len(rest), rest)
                by_first[(node, chain[pos])] = leaf
                return leaf
            own = self.hashes[child]
            size = len(own)
            common = 1
            limit = min(size, total - pos)
            while common < limit and own[common] == chain[pos + common]:
                common += 1
            if common < size:
                child = self._split(child, common)
            node = child
            pos += common
        return node

    def _split(self, node: int, keep: int) -> int:
        """Cut ``node`` after ``keep`` blocks; the head becomes a new parent. Returns the head."""
        own = self.hashes[node]
        parent = self.parent[node]
        head = self._new(parent, keep, own[:keep])
        self._by_first[(parent, own[0])] = head
        self.hashes[node] = own[keep:]
        self.blocks[node] = len(own) - keep
        self.parent[node] = head
        self._by_first[(head, own[keep])] = node
        return head

    def extend(self, parent: int, blocks: int) -> int:
        """A new synthetic child of ``parent`` with ``blocks`` blocks."""
        node = len(self.parent)
        self.parent.append(parent)
        self.blocks.append(blocks)
        return node

    def path(self, leaf: int) -> tuple[int, ...]:
        """Nodes from the root to ``leaf`` that hold at least one block, root excluded."""
        nodes: list[int] = []
        parent = self.parent
        blocks = self.blocks
        while leaf > ROOT:
            if blocks[leaf]:
                nodes.append(leaf)
            leaf = parent[leaf]
        nodes.reverse()
        return tuple(nodes)

    def key_at(self, path: Sequence[int], depth: int) -> int:
        """The chain hash of block ``depth - 1`` along ``path`` (synthetic where not real)."""
        seen = 0
        for node in path:
            size = self.blocks[node]
            if depth <= seen + size:
                own = self.hashes.get(node)
                index = depth - 1 - seen
                return own[index] if own is not None else _mix(node, index)
            seen += size
        raise ValueError(f"depth {depth} beyond the path's {seen} blocks")


@dataclass(slots=True)
class ShapedTrace:
    """Per-request shapes (parallel arrays) and the two tries their paths run through."""

    block_chars: int
    block_size: int
    offsets: array[float] = field(default_factory=lambda: array("d"))
    streams: bytearray = field(default_factory=bytearray)
    max_tokens: array[int] = field(default_factory=lambda: array("i"))
    prompt_tokens: array[int] = field(default_factory=lambda: array("i"))
    """Prompt tokens as the simulator counts them."""
    tenants: array[int] = field(default_factory=lambda: array("i"))
    tenant_names: list[str] = field(default_factory=list)
    rt_paths: list[tuple[int, ...]] = field(default_factory=list)
    sim_paths: list[tuple[int, ...]] = field(default_factory=list)
    rt_totals: array[int] = field(default_factory=lambda: array("i"))
    """Full router blocks per request (the length of its live chain)."""
    rt_trie: ChainTrie = field(default_factory=ChainTrie)
    sim_trie: ChainTrie = field(default_factory=ChainTrie)
    meta: dict[str, Any] = field(default_factory=dict)
    _keys: dict[int, list[int | None]] = field(default_factory=dict)
    _leaves: tuple[array[int], array[int]] = field(default_factory=lambda: (array("i"), array("i")))
    """Each request's last node in each trie until `_finish` turns them into paths."""

    def __len__(self) -> int:
        return len(self.offsets)

    def affinity_keys(self, affinity_blocks: int) -> list[int | None]:
        """Each request's ring key: its chain hash at depth min(blocks, affinity_blocks)."""
        keys = self._keys.get(affinity_blocks)
        if keys is None:
            trie = self.rt_trie
            keys = []
            # Requests with one head share its keys: one int object per distinct key.
            seen: dict[int, int] = {}
            for path, total in zip(self.rt_paths, self.rt_totals, strict=True):
                depth = min(total, affinity_blocks)
                if depth > 0:
                    key = trie.key_at(path, depth)
                    keys.append(seen.setdefault(key, key))
                else:
                    keys.append(None)
            self._keys[affinity_blocks] = keys
        return keys

    def _tenant_index(self, name: str, known: dict[str, int]) -> int:
        index = known.get(name)
        if index is None:
            index = known[name] = len(self.tenant_names)
            self.tenant_names.append(name)
        return index

    def _append(
        self,
        offset: float,
        stream: bool,
        max_tokens: int,
        prompt_tokens: int,
        tenant: int,
        rt_leaf: int,
        sim_leaf: int,
    ) -> None:
        self.offsets.append(offset)
        self.streams.append(1 if stream else 0)
        self.max_tokens.append(max_tokens)
        self.prompt_tokens.append(prompt_tokens)
        self.tenants.append(tenant)
        # Leaves for now: a later split can change a leaf's ancestors, so paths wait for
        # `_finish`.
        self._leaves[0].append(rt_leaf)
        self._leaves[1].append(sim_leaf)

    def _finish(self) -> None:
        rt_leaves, sim_leaves = self._leaves
        self.rt_paths, self.rt_totals = _paths(self.rt_trie, rt_leaves)
        self.sim_paths, _ = _paths(self.sim_trie, sim_leaves)
        self._leaves = (array("i"), array("i"))


def _paths(trie: ChainTrie, leaves: Iterable[int]) -> tuple[list[tuple[int, ...]], array[int]]:
    """`ChainTrie.path` of each leaf, and the blocks along it.

    One int object per node, shared by every path through it (the trie's arrays hold none),
    so a million paths of a few nodes cost a tuple each.
    """
    parent, blocks = trie.parent, trie.blocks
    shared: list[int | None] = [None] * len(parent)
    paths: list[tuple[int, ...]] = []
    totals = array("i")
    nodes: list[int] = []
    for leaf in leaves:
        total = 0
        node = leaf
        while node > ROOT:
            size = blocks[node]
            if size:
                total += size
                known = shared[node]
                if known is None:
                    shared[node] = known = node
                nodes.append(known)
            node = parent[node]
        nodes.reverse()
        paths.append(tuple(nodes))
        nodes.clear()
        totals.append(total)
    return paths, totals


def sim_chain(tenant: str, token_ids: Sequence[int], block_size: int) -> list[int]:
    """The simulator's full blocks as a chain rooted in the tenant's salt (ids up to 2**40)."""
    full = len(token_ids) - len(token_ids) % block_size
    data = array("Q", token_ids[:full]).tobytes()
    stride = 8 * block_size
    parent: int = mmh3.mmh3_x64_128_utupledigest(f"salt|{tenant}".encode(), 0)[0]
    chain: list[int] = []
    for start in range(0, len(data), stride):
        parent = mmh3.mmh3_x64_128_utupledigest(
            parent.to_bytes(8, "little") + data[start : start + stride], 0
        )[0]
        chain.append(parent)
    return chain


def shape_requests(
    requests: Iterable[TraceRequest], *, block_chars: int = 64, block_size: int = 16
) -> ShapedTrace:
    """Exact shapes of recorded requests: the router's and the simulator's real block chains."""
    with paused_gc():
        return _shape_requests(requests, block_chars, block_size)


def _shape_requests(
    requests: Iterable[TraceRequest], block_chars: int, block_size: int
) -> ShapedTrace:
    shaped = ShapedTrace(block_chars, block_size, meta={"mode": "trace"})
    hasher = ApproxHasher(block_chars)
    known: dict[str, int] = {}
    for request in requests:
        body = request.body
        model = str(body.get("model") or "")
        chat = request.path == CHAT_PATH
        prompt = (
            render_chat(body["messages"], body.get("tools"))
            if chat
            else render_completion(body["prompt"])
        )
        rt_chain = hasher.chain(scope_key(request.tenant, model), prompt)
        try:
            parsed = parse_request(
                "chat" if chat else "completion",
                body,
                served_model=model,
                max_model_len=_UNBOUNDED_LEN,
            )
        except ApiError as exc:
            raise ValueError(f"request {request.index}: the simulator rejects it: {exc}") from exc
        ids = parsed.prompt_ids
        shaped._append(
            request.offset,
            request.stream,
            parsed.max_tokens,
            len(ids),
            shaped._tenant_index(request.tenant, known),
            shaped.rt_trie.insert(rt_chain),
            shaped.sim_trie.insert(sim_chain(request.tenant, ids, block_size)),
        )
    shaped._finish()
    return shaped


# --- the structural mode ----------------------------------------------------------------


class _NoText:
    """Stands in for a `Head` inside the generator: the structure needs no text."""

    def messages(self) -> list[dict[str, str]]:
        return []

    def text(self) -> str:
        return ""


class _StructureGenerator(WorkloadGenerator):
    """The real generator with chat texts replaced by length draws (same picks, same order).

    Only the text stream differs: arrivals, tenants, versions and conversations come from the
    generator's own code and RNG streams, so they match `generate_trace` request for request.
    """

    def __init__(self, config: WorkloadConfig) -> None:
        super().__init__(config)
        pool_rng = random.Random(f"{config.seed}|shape-pool")
        self.user_lengths = [len(user_tail(pool_rng)) for _ in range(_POOL_SIZE)]
        self.reply_lengths = [len(assistant_reply(pool_rng)) for _ in range(_POOL_SIZE)]
        self._draw_rng = random.Random(f"{config.seed}|shape-draws")
        self.turn_pieces: list[tuple[str, int]] = []
        """The messages the last chat request appended: (role, content length)."""

    def head(self, tenant_index: int, version: int) -> Head:
        return _NoText()  # type: ignore[return-value]

    def _chat_body(self, conv: Any, stream: bool, max_tokens: int) -> dict[str, Any]:
        draw = self._draw_rng.randrange
        pieces = []
        if conv.turns > 0:
            pieces.append(("assistant", self.reply_lengths[draw(_POOL_SIZE)]))
        pieces.append(("user", self.user_lengths[draw(_POOL_SIZE)]))
        self.turn_pieces = pieces
        conv.turns += 1
        return {"model": self.config.model, "stream": stream, "max_tokens": max_tokens}


def _rt_message_chars(role: str, length: int) -> int:
    """Length of one message in the router's rendering (`router.core.render`)."""
    return 1 + len(f"r{len(role)}:{role}") + len(f"c{length}:") + length


def _sim_message_bytes(role: str, length: int) -> int:
    """Length of one message in the simulator's chat template (ASCII content)."""
    return len(f"<|{role}|>") + length + len("<|end|>\n")


@dataclass(slots=True)
class _Cursor:
    """Where a prompt stands in both tries: the node it ends at and its length so far."""

    rt_node: int
    rt_units: int
    sim_node: int
    sim_bytes: int


def _advance(trie: ChainTrie, node: int, units: int, length: int, block: int) -> tuple[int, int]:
    """A new node for ``length`` more units after ``units``: the blocks they complete."""
    end = units + length
    return trie.extend(node, end // block - units // block), end


def shape_workload(
    config: WorkloadConfig, *, block_chars: int = 64, block_size: int = 16
) -> ShapedTrace:
    """Structural shapes of the trace ``config`` generates (see the module docstring)."""
    with paused_gc():
        return _shape_workload(config, block_chars, block_size)


def _shape_workload(config: WorkloadConfig, block_chars: int, block_size: int) -> ShapedTrace:
    shaped = ShapedTrace(block_chars, block_size, meta={"mode": "structure"})
    generator = _StructureGenerator(config)
    hasher = ApproxHasher(block_chars)
    sim_block_bytes = 4 * block_size
    heads: dict[tuple[int, int, bool], _Cursor] = {}
    conversations: dict[str, _Cursor] = {}
    known: dict[str, int] = {}
    tenant_rank = {t.id: i for i, t in enumerate(generator.tenants)}
    rt_trie, sim_trie = shaped.rt_trie, shaped.sim_trie

    def head_cursor(tenant: int, version: int, chat: bool) -> _Cursor:
        key = (tenant, version, chat)
        cursor = heads.get(key)
        if cursor is None:
            spec = generator.tenants[tenant]
            head = WorkloadGenerator.head(generator, tenant, version)
            messages = head.messages()
            rt_text = render_chat(messages) if chat else head.text()
            sim_text = sim_render_chat(messages, add_generation_prompt=False) if chat else rt_text
            rt_leaf = rt_trie.insert(hasher.chain(scope_key(spec.id, config.model), rt_text))
            sim_leaf = sim_trie.insert(sim_chain(spec.id, encode(sim_text), block_size))
            cursor = heads[key] = _Cursor(rt_leaf, len(rt_text), sim_leaf, len(sim_text.encode()))
        return cursor

    for request in generator:
        t = tenant_rank[request.tenant]
        chat = request.path == CHAT_PATH
        if chat:
            conv = request.conversation
            assert conv is not None
            cursor = conversations.get(conv)
            if cursor is None:
                base = head_cursor(t, request.prefix_version, True)
                cursor = _Cursor(base.rt_node, base.rt_units, base.sim_node, base.sim_bytes)
            # Every message is new text (a conversation's turns are generated once), so each
            # one is a new node: nothing below a head is shared between conversations.
            for role, length in generator.turn_pieces:
                cursor.rt_node, cursor.rt_units = _advance(
                    rt_trie, cursor.rt_node, cursor.rt_units, _rt_message_chars(role, length),
                    block_chars,
                )  # fmt: skip
                cursor.sim_node, cursor.sim_bytes = _advance(
                    sim_trie, cursor.sim_node, cursor.sim_bytes,
                    _sim_message_bytes(role, length), sim_block_bytes,
                )  # fmt: skip
            if request.turn >= config.max_turns:
                conversations.pop(conv, None)
            else:
                conversations[conv] = cursor
            sim_leaf, sim_total = _advance(
                sim_trie, cursor.sim_node, cursor.sim_bytes, len(_GEN_PROMPT), sim_block_bytes
            )
            rt_leaf = cursor.rt_node
        else:
            base = head_cursor(t, request.prefix_version, False)
            tail = len(request.body["prompt"])  # the stand-in head has no text: all tail
            rt_leaf, _ = _advance(rt_trie, base.rt_node, base.rt_units, tail, block_chars)
            sim_leaf, sim_total = _advance(
                sim_trie, base.sim_node, base.sim_bytes, tail, sim_block_bytes
            )
        shaped._append(
            request.offset,
            request.stream,
            int(request.body["max_tokens"]),
            -(-sim_total // 4),
            shaped._tenant_index(request.tenant, known),
            rt_leaf,
            sim_leaf,
        )
    shaped._finish()
    shaped.meta["workload"] = config.to_json()
    return shaped
