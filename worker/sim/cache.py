"""A paged prefix cache that behaves like vLLM v1's block pool with prefix caching on.

- The cache has ``num_blocks`` blocks of ``block_size`` tokens. A request holds a list of
  blocks covering its tokens; each block has a reference count.
- Only full blocks get a hash (see `hashing`), registered in a hash -> blocks map as soon as
  the request is admitted (vLLM caches a block when it schedules the tokens that fill it).
  Blocks filled later by generated tokens are registered as they fill.
- A request's cache hit is the longest run of its leading block hashes found in the map,
  capped at ``(num_tokens - 1) // block_size`` blocks: the last prompt token is always
  recomputed to get logits and hits are block-aligned, so a prompt of exactly k blocks hits
  at most k-1 of them.
- Free blocks wait in an eviction queue. It starts in block-id order; a finishing request
  appends its blocks tail-first (its last block is evicted first), so eviction is LRU across
  requests. A free block keeps its hash and can still be hit (then it leaves the queue);
  its hash is dropped only when the block is taken for new tokens. Blocks with a
  reference count above zero are never in the queue, so never evicted.
- Admission needs free blocks for the uncached prompt blocks plus, unlike vLLM, a
  reservation for the blocks the completion will fill: the simulator never preempts, so it
  admits only what it can finish (vLLM would admit and preempt later).
- Stored, removed and cleared hashes are reported to the callbacks in ``listeners`` (the seam
  for vLLM-format KV events, `worker.sim.kv_publisher`); with no listener nothing is built.
  As in vLLM, a block that is recomputed although its hash is cached (the capped last block
  of a prompt of whole blocks) is stored again, and evicting one of two holders of a hash
  reports it removed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from worker.sim.hashing import BlockHasher


@dataclass(eq=False, slots=True)
class Block:
    """One KV block: its id, how many running requests hold it, and its hash once full."""

    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks were registered, in chain order (vLLM's BlockStored event)."""

    block_hashes: tuple[bytes, ...]
    parent_block_hash: bytes | None
    token_ids: tuple[int, ...]
    block_size: int
    cache_salt: str | None = None
    """The request's salt: vLLM reports it among block 0's extra keys."""


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks were evicted and their hashes forgotten (vLLM's BlockRemoved event)."""

    block_hashes: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """Every hash was forgotten at once (vLLM's AllBlocksCleared event)."""


CacheEvent = BlockStored | BlockRemoved | AllBlocksCleared
CacheListener = Callable[[CacheEvent], None]


@dataclass(eq=False, slots=True)
class Allocation:
    """The blocks one admitted request holds, and what it has put in the cache so far."""

    tokens: list[int]
    """Tokens whose KV the request has computed or will compute in its prefill."""
    salt: str | None
    hashes: list[bytes]
    """Hashes of the full blocks of ``tokens`` known so far."""
    blocks: list[Block] = field(default_factory=list)
    num_cached_blocks: int = 0
    """Leading blocks already registered in the hash map (hit, or stored by this request)."""
    reserved: int = 0
    """Blocks promised to this request for the tokens it will still generate."""
    hit_tokens: int = 0
    """Prompt tokens served from the cache at admission."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class PrefixCache:
    """Block pool, hash map and eviction queue of one simulated worker."""

    def __init__(
        self,
        num_blocks: int,
        hasher: BlockHasher,
        listeners: list[CacheListener] | None = None,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = hasher.block_size
        self.hasher = hasher
        self.listeners: list[CacheListener] = listeners if listeners is not None else []
        self._blocks = [Block(i) for i in range(num_blocks)]
        # Insertion order is eviction order: popitem(last=False) takes the LRU block.
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self._blocks)
        # Several blocks may hold the same hash (vLLM does not de-duplicate either).
        self._by_hash: dict[bytes, dict[int, Block]] = {}
        self._num_hashed = 0
        self._reserved = 0

    # ---- observation -------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks in the eviction queue (free, whether or not they still hold a hash)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one running request."""
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks holding a hash (hittable), in use or free."""
        return self._num_hashed

    @property
    def num_reserved(self) -> int:
        """Free blocks promised to running requests for their remaining decode."""
        return self._reserved

    @property
    def usage(self) -> float:
        """vLLM's kv_cache_usage_perc: the fraction of blocks not in the free queue (0..1)."""
        return 1.0 - len(self._free) / self.num_blocks

    def free_block_ids(self) -> list[int]:
        """The eviction queue, next victim first (for tests and debugging)."""
        return list(self._free)

    def is_cached(self, block_hash: bytes) -> bool:
        """Whether some block currently holds ``block_hash``."""
        return block_hash in self._by_hash

    def longest_hit(self, hashes: Sequence[bytes], num_tokens: int) -> list[Block]:
        """Blocks for the longest cached prefix of ``hashes``, capped as vLLM caps it."""
        max_blocks = max(0, (num_tokens - 1) // self.block_size)
        hit: list[Block] = []
        for block_hash in hashes[:max_blocks]:
            holders = self._by_hash.get(block_hash)
            if not holders:
                break
            hit.append(next(iter(holders.values())))
        return hit

    # ---- request lifecycle -------------------------------------------------------------

    def admit(
        self,
        tokens: list[int],
        hashes: list[bytes],
        salt: str | None,
        max_new_tokens: int,
    ) -> Allocation | None:
        """Allocate blocks for a prompt, or None if they cannot be had now.

        ``hashes`` are the prompt's full-block hashes. On success the hit blocks are
        referenced, new blocks taken (evicting LRU hashes), blocks for the completion
        reserved, and the prompt's remaining full blocks registered in the cache.
        """
        num_tokens = len(tokens)
        if num_tokens < 1:
            raise ValueError("a prompt needs at least one token")
        hit = self.longest_hit(hashes, num_tokens)
        prompt_blocks = _cdiv(num_tokens, self.block_size)
        num_new = prompt_blocks - len(hit)
        # The last generated token is returned but never fed back, so it needs no KV slot.
        lifetime_blocks = _cdiv(num_tokens + max(max_new_tokens, 1) - 1, self.block_size)
        reserve = max(0, lifetime_blocks - prompt_blocks)
        evictable_hits = sum(1 for block in hit if block.ref_cnt == 0)
        if len(self._free) - evictable_hits - self._reserved < num_new + reserve:
            return None

        for block in hit:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1
        blocks = list(hit)
        blocks.extend(self._take_free() for _ in range(num_new))
        self._reserved += reserve
        allocation = Allocation(
            tokens=list(tokens),
            salt=salt,
            hashes=list(hashes),
            blocks=blocks,
            num_cached_blocks=len(hit),
            reserved=reserve,
            hit_tokens=len(hit) * self.block_size,
        )
        self._register_full_blocks(allocation)
        return allocation

    def grow(self, allocation: Allocation, new_tokens: Sequence[int]) -> None:
        """Account for generated tokens whose KV is now computed: add blocks, cache full ones."""
        if not new_tokens:
            return
        allocation.tokens.extend(new_tokens)
        needed = _cdiv(len(allocation.tokens), self.block_size)
        while len(allocation.blocks) < needed:
            if allocation.reserved > 0:
                allocation.reserved -= 1
                self._reserved -= 1
            elif len(self._free) <= self._reserved:
                raise RuntimeError("allocation grew beyond its reservation and the cache is full")
            allocation.blocks.append(self._take_free())
        self._register_full_blocks(allocation)

    def release(self, allocation: Allocation) -> None:
        """A request finished or was aborted: unreference its blocks, drop its reservation."""
        # Tail first, so that within one request the deepest block is evicted first.
        for block in reversed(allocation.blocks):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
        allocation.blocks = []
        self._reserved -= allocation.reserved
        allocation.reserved = 0

    def reset(self) -> None:
        """Forget every hash (blocks held by running requests stay allocated)."""
        for block in self._blocks:
            block.block_hash = None
        self._by_hash.clear()
        self._num_hashed = 0
        self._emit(AllBlocksCleared())

    # ---- internals ---------------------------------------------------------------------

    def _take_free(self) -> Block:
        _, block = self._free.popitem(last=False)
        if block.block_hash is not None:
            self._evict(block)
        block.ref_cnt = 1
        return block

    def _evict(self, block: Block) -> None:
        block_hash = block.block_hash
        assert block_hash is not None
        holders = self._by_hash.get(block_hash)
        if holders is not None and holders.pop(block.block_id, None) is not None:
            self._num_hashed -= 1
            if not holders:
                del self._by_hash[block_hash]
            if self.listeners:
                self._emit(BlockRemoved((block_hash,)))
        block.block_hash = None

    def _register_full_blocks(self, allocation: Allocation) -> None:
        size = self.block_size
        start = allocation.num_cached_blocks
        full = min(len(allocation.tokens) // size, len(allocation.blocks))
        if full <= start:
            return
        if len(allocation.hashes) < full:
            self.hasher.extend(allocation.hashes, allocation.tokens, allocation.salt)
        for index in range(start, full):
            block = allocation.blocks[index]
            block_hash = allocation.hashes[index]
            if block.block_hash is None:
                block.block_hash = block_hash
                self._by_hash.setdefault(block_hash, {})[block.block_id] = block
                self._num_hashed += 1
        allocation.num_cached_blocks = full
        if self.listeners:
            self._emit(
                BlockStored(
                    block_hashes=tuple(allocation.hashes[start:full]),
                    parent_block_hash=allocation.hashes[start - 1] if start > 0 else None,
                    token_ids=tuple(allocation.tokens[start * size : full * size]),
                    block_size=size,
                    cache_salt=allocation.salt,
                )
            )

    def _emit(self, event: CacheEvent) -> None:
        for listener in self.listeners:
            listener(event)
