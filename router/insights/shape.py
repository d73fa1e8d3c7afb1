"""The prompt-shape advisor: content that recurs across requests but sits behind content that
varies, so the prefix cache cannot reuse it.

A prefix cache reuses a block only when every block before it matches too. A route whose
requests start with a request id, a timestamp or retrieved snippets, and only then carry a
long stable head (system prompt, tools, examples), gets no hits: the chain breaks at the first
block. Nothing in the chain hashes shows what was lost. This module compares two views of the
sampled requests of each route (per tenant, since tenants never share a cache):

- **chained**: the longest prefix of the request's block chain (the router's own chained
  hashes) that an earlier sample of the route already had. That is what the cache can reuse.
- **recurring**: position-free fingerprints of content-defined chunks of the rendered prompt.
  A chunk ends at the first punctuation or line break at least `CHUNK_MIN` characters after
  its start (or after `CHUNK_MAX` characters), so chunk boundaries depend on the text, not on
  its offset: the same stable text yields the same chunks behind a head of any length.

Content that recurs *after* the chained prefix is what a reordering (stable content first,
request-specific content last) would let the cache reuse. Per sample the advisor records the
chained depth, where the divergence starts (refined to 4 characters, about one token, by
comparing the divergent block's 4-character pieces with the previous sample's), the
recurring content after it, and the redacted shape of the varying stretch between the two.
A route is flagged when the mean saving per request reaches a threshold.

Bounded and cheap: each route has two set-associative fingerprint tables of fixed size (a
newcomer to a full bucket evicts an older value: an estimate may lose a little, memory never
grows); per route and tenant, a few sums and a ring of recent offsets. Only the content past
the chained prefix is chunked, so a well-shaped route costs a binary search over its chain.
Fingerprints are keyed by a per-process secret and never leave the process; only counts,
offsets and redacted shapes do.
"""

from __future__ import annotations

import re
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from router.insights.redact import redact_shape

CHUNK_MIN = 64
"""Shortest chunk in characters: short pieces ("Yes.", a bracket) recur everywhere and say
nothing about a prompt's shape."""
CHUNK_MAX = 256
"""Longest chunk: text without punctuation is cut at this length."""
PIECE = 4
"""Granularity of the divergence offset in characters (about one token)."""
APPROX_TOKENS_PER_CHAR = 0.25
"""Until usage reports calibrate a route: about four characters per token."""
OFFSETS_KEPT = 32
SHAPES_KEPT = 4
DECAY = 0.5 ** (1 / 512)
"""Per-sample decay of the running means: old samples fade with a half-life of 512 samples,
so a route that got fixed stops being flagged."""

_ANCHORS = r".!?;,:\n\x1d\x1e}\]"
# A chunk: CHUNK_MIN characters, then up to the first anchor (included), at most CHUNK_MAX in
# all; the end of the text ends the last one. Greedy repeats of one character class are the
# fast path of Python's regex engine: one pass in C, about 10 ns per character.
_CHUNK = re.compile(
    rf"(?s).{{{CHUNK_MIN - 1}}}[^{_ANCHORS}]{{0,{CHUNK_MAX - CHUNK_MIN}}}[{_ANCHORS}]?|.+"
)
_MASK = (1 << 64) - 1


class FingerprintTable:
    """A fixed-size, 4-way set-associative set of 64-bit fingerprints (8 bytes per slot).

    A value lives in one bucket of four slots chosen by its bits; a newcomer takes a free
    slot of its bucket, or evicts one when all four are taken. Each slot's lowest bit marks a
    value added again after its first time: a full bucket evicts an unmarked value first, so
    content that recurs (a route's stable head) survives the stream of one-off values (every
    request's own tail) that keeps arriving for as long as the router runs. Without the mark
    a long-lived table fills with tails, evicts blocks from the middle of a stable head, and
    the chained match looks shorter than it is: a well-shaped route would be flagged.
    Membership is "seen, unless evicted": enough for an estimate, and the memory is fixed.
    """

    __slots__ = ("_buckets", "_slots")

    def __init__(self, slots: int) -> None:
        size = 1 << max(6, (slots - 1).bit_length())
        self._slots = array("Q", bytes(8 * size))
        self._buckets = (size >> 2) - 1

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, fingerprint: int) -> bool:
        return self.seen([(fingerprint & _MASK) or 1])[0]

    def add(self, fingerprint: int) -> None:
        self.add_all([(fingerprint & _MASK) or 1])  # 0 marks an empty slot

    @staticmethod
    def _marked(value: int) -> int:
        """The value's marked form (lowest bit set); its unmarked form is this minus one,
        never 0 (0 is an empty slot)."""
        return value | 1 if value > 1 else 3

    def seen(self, values: Sequence[int]) -> list[bool]:
        """Membership of each of ``values``, which must be 64-bit and non-zero (the fast
        path `ShapeAdvisor` uses)."""
        slots, buckets = self._slots, self._buckets
        found: list[bool] = []
        append = found.append
        for value in values:
            marked = value | 1 if value > 1 else 3
            base = ((marked >> 1) & buckets) << 2
            append(
                slots[base] | 1 == marked
                or slots[base + 1] | 1 == marked
                or slots[base + 2] | 1 == marked
                or slots[base + 3] | 1 == marked
            )
        return found

    def add_all(self, values: Sequence[int]) -> None:
        """`add` for values that are already 64-bit and non-zero; a value already present
        is marked as recurring."""
        # Slots are never emptied and a bucket fills in order, so the first empty slot ends
        # the search: a value behind it cannot be there.
        slots, buckets = self._slots, self._buckets
        for value in values:
            marked = value | 1 if value > 1 else 3
            base = ((marked >> 1) & buckets) << 2
            victim = -1
            for index in range(base, base + 4):
                held = slots[index]
                if held == 0:
                    slots[index] = marked - 1
                    break
                if held | 1 == marked:
                    slots[index] = marked
                    break
                if victim < 0 and not held & 1:
                    victim = index
            else:
                # A full bucket: the first value seen only once goes; if all four recur,
                # the newcomer's high bits pick one (deterministic).
                slots[victim if victim >= 0 else base + (marked >> 62)] = marked - 1

    @property
    def nbytes(self) -> int:
        return len(self._slots) * self._slots.itemsize


def chunk_texts(text: str, start: int = 0) -> list[str]:
    """The content-defined chunks of ``text[start:]`` (see the module docstring), in order;
    they concatenate to ``text[start:]`` and only the last may be shorter than `CHUNK_MIN`."""
    return _CHUNK.findall(text, start)


def content_chunks(text: str, start: int = 0) -> list[tuple[int, int]]:
    """``(start, end)`` of each chunk of `chunk_texts`."""
    spans: list[tuple[int, int]] = []
    pos = start
    for chunk in _CHUNK.findall(text, start):
        spans.append((pos, pos + len(chunk)))
        pos += len(chunk)
    return spans


def seen_prefix(table: FingerprintTable, chain: Sequence[int]) -> int:
    """How many leading hashes of ``chain`` were recorded in ``table``: one past the deepest
    one found.

    A chain hash covers every block before it, so the deepest recorded hash gives the depth
    even when a hash in the middle was evicted since (a first-miss or binary search would
    stop there and make a stable head look short)."""
    present = table.seen([(h & _MASK) or 1 for h in chain])
    for index in range(len(present) - 1, -1, -1):
        if present[index]:
            return index + 1
    return 0


def _wants_shape(flagged_so_far: int) -> bool:
    return flagged_so_far < SHAPES_KEPT or flagged_so_far % 16 == 0


@dataclass(frozen=True, slots=True)
class ShapeSample:
    """What one analysed request showed (characters of the router's rendering)."""

    total_chars: int
    chained_chars: int
    """The leading blocks an earlier sample of the route shared (reusable by the cache)."""
    divergence_chars: int
    """Where this request first differs from the previous sample (4-character precision)."""
    recurring_after_chars: int
    """Content seen in earlier samples that sits after the chained prefix."""
    varying_chars: int
    """From the divergence to the first recurring content after it."""
    shape: str | None
    """Redacted shape of that varying stretch, when the sample showed recurring content."""


@dataclass(slots=True)
class ShapeStats:
    """Running figures of one route and tenant."""

    samples: int = 0
    weight: float = 0.0
    chained: float = 0.0
    recurring: float = 0.0
    varying: float = 0.0
    varying_weight: float = 0.0
    total: float = 0.0
    flagged_samples: int = 0
    usage_chars: int = 0
    usage_tokens: int = 0
    offsets: deque[int] = field(default_factory=lambda: deque(maxlen=OFFSETS_KEPT))
    shapes: dict[str, int] = field(default_factory=dict)
    last_block: tuple[int, list[int]] | None = None

    def add(self, sample: ShapeSample, flag_chars: int) -> None:
        self.samples += 1
        self.weight = self.weight * DECAY + 1.0
        self.chained = self.chained * DECAY + sample.chained_chars
        self.recurring = self.recurring * DECAY + sample.recurring_after_chars
        self.total = self.total * DECAY + sample.total_chars
        flagged = sample.recurring_after_chars >= flag_chars
        self.varying = self.varying * DECAY + (sample.varying_chars if flagged else 0)
        self.varying_weight = self.varying_weight * DECAY + flagged
        if flagged:
            self.flagged_samples += 1
            self.offsets.append(sample.divergence_chars)
            if sample.shape is not None:
                self._count_shape(sample.shape)

    def _count_shape(self, shape: str) -> None:
        if shape in self.shapes:
            self.shapes[shape] += 1
        elif len(self.shapes) < SHAPES_KEPT:
            self.shapes[shape] = 1
        else:
            # Replace the rarest, so a route's dominant shape always shows.
            rarest = min(self.shapes, key=self.shapes.__getitem__)
            del self.shapes[rarest]
            self.shapes[shape] = 1

    @property
    def tokens_per_char(self) -> float:
        if self.usage_chars > 0 and self.usage_tokens > 0:
            return self.usage_tokens / self.usage_chars
        return APPROX_TOKENS_PER_CHAR


@dataclass(slots=True)
class _RouteTables:
    chains: FingerprintTable
    chunks: FingerprintTable


class ShapeAdvisor:
    """Analyses sampled prompts per route and tenant; `report` says which routes to reshape.

    ``key`` keys the fingerprints (pass a random one per process; tests pass a fixed one).
    Routes and tenants must already be capped by the caller: this class keeps one pair of
    tables per route and one `ShapeStats` per (route, tenant) it is given.
    """

    def __init__(
        self,
        *,
        block_chars: int,
        slots: int,
        min_savings_tokens: int,
        min_samples: int,
        key: int = 0,
    ) -> None:
        self.block_chars = block_chars
        self.slots = slots
        self.min_savings_tokens = min_savings_tokens
        self.min_samples = min_samples
        self._key = key & _MASK
        self._tables: dict[str, _RouteTables] = {}
        self._stats: dict[tuple[str, str], ShapeStats] = {}

    def _route_tables(self, route: str) -> _RouteTables:
        tables = self._tables.get(route)
        if tables is None:
            tables = _RouteTables(FingerprintTable(self.slots), FingerprintTable(self.slots))
            self._tables[route] = tables
        return tables

    def stats(self, route: str, tenant: str) -> ShapeStats:
        stats = self._stats.get((route, tenant))
        if stats is None:
            stats = self._stats[(route, tenant)] = ShapeStats()
        return stats

    def observe(
        self,
        route: str,
        tenant: str,
        text: str,
        chain: Sequence[int],
        prompt_tokens: int | None = None,
    ) -> ShapeSample:
        """Analyse one rendered prompt (``chain``: its chained block hashes, tenant-scoped)."""
        tables = self._route_tables(route)
        stats = self.stats(route, tenant)
        if prompt_tokens:
            stats.usage_chars += len(text)
            stats.usage_tokens += prompt_tokens
        depth = seen_prefix(tables.chains, chain)
        # All of it, not only the unseen part: adding the seen blocks again marks them as
        # recurring, which is what keeps a stable head in the table.
        tables.chains.add_all([(h & _MASK) or 1 for h in chain])
        chained = depth * self.block_chars
        divergence = self._refine(stats, text, depth, chained)
        salt = hash(tenant) ^ self._key
        chunks = _CHUNK.findall(text, chained)
        prints = [((hash(chunk) ^ salt) & _MASK) or 1 for chunk in chunks]
        table = tables.chunks
        seen = table.seen(prints)
        recurring = 0
        first: int | None = None
        pos = chained
        for chunk, present in zip(chunks, seen, strict=True):
            size = len(chunk)
            # Recurring text before the divergence is shared with the previous sample: it
            # sits in the (last, partial) block of the shared prefix, not behind a change.
            if present and pos >= divergence:
                recurring += size
                if first is None:
                    first = pos
            pos += size
        table.add_all(prints)
        varying_end = first if first is not None else len(text)
        flag_chars = self.flag_chars(stats)
        shape = None
        # A shape is an example: the first few flagged samples and then one in 16 are
        # enough, and redaction is the costliest step of a flagged sample.
        if recurring >= flag_chars and first is not None and _wants_shape(stats.flagged_samples):
            shape = redact_shape(text[divergence:first])
        sample = ShapeSample(
            total_chars=len(text),
            chained_chars=chained,
            divergence_chars=divergence,
            recurring_after_chars=recurring,
            varying_chars=max(0, varying_end - divergence),
            shape=shape,
        )
        stats.add(sample, flag_chars)
        return sample

    def flag_chars(self, stats: ShapeStats) -> int:
        """The recurring content (characters) that makes one sample count as badly shaped."""
        return max(1, round(self.min_savings_tokens / stats.tokens_per_char))

    def _refine(self, stats: ShapeStats, text: str, depth: int, chained: int) -> int:
        """The divergence offset within the first unshared block, to `PIECE` characters, from
        the previous sample's pieces of the same block (kept as keyed hashes, in memory)."""
        block = text[chained : chained + self.block_chars]
        pieces = [hash(block[i : i + PIECE]) for i in range(0, len(block), PIECE)]
        previous = stats.last_block
        stats.last_block = (depth, pieces)
        if previous is None or previous[0] != depth:
            return chained
        common = 0
        for mine, theirs in zip(pieces, previous[1], strict=False):
            if mine != theirs:
                break
            common += 1
        return min(len(text), chained + common * PIECE)

    def routes(self) -> list[tuple[str, str]]:
        return sorted(self._stats)

    def report(self) -> list[dict[str, Any]]:
        """One entry per route and tenant with enough samples, worst first."""
        entries = [self._entry(route, tenant) for route, tenant in self._stats]
        entries.sort(key=lambda e: (-e["savings_tokens_per_request"], e["route"], e["tenant"]))
        return entries

    def _entry(self, route: str, tenant: str) -> dict[str, Any]:
        stats = self._stats[(route, tenant)]
        per_token = stats.tokens_per_char
        weight = stats.weight or 1.0
        savings = stats.recurring / weight * per_token
        judged = stats.samples >= self.min_samples
        flagged = judged and savings >= self.min_savings_tokens
        offsets = sorted(stats.offsets)
        divergence: dict[str, int] | None = None
        if offsets:
            chars = offsets[len(offsets) // 2]
            divergence = {
                "block": chars // self.block_chars,
                "char_offset": chars,
                "token_offset": round(chars * per_token),
            }
        shape = max(stats.shapes, key=stats.shapes.__getitem__) if stats.shapes else None
        advice = None
        if flagged and divergence is not None:
            advice = (
                f"about {round(savings)} tokens recur in every request but sit after content "
                f"that varies from token ~{divergence['token_offset']} (block "
                f"{divergence['block']}); move the varying part after the stable content to "
                f"save about {round(savings)} prefill tokens per request"
            )
        return {
            "route": route,
            "tenant": tenant,
            "samples": stats.samples,
            "judged": judged,
            "flagged": flagged,
            "flagged_samples": stats.flagged_samples,
            "prompt_tokens": round(stats.total / weight * per_token),
            "chained_tokens": round(stats.chained / weight * per_token),
            "stable_tokens_after_divergence": round(savings),
            "varying_head_tokens": round(stats.varying / stats.varying_weight * per_token)
            if stats.varying_weight > 0
            else 0,
            "divergence": divergence,
            "varying_head_shape": shape if flagged else None,
            "savings_tokens_per_request": round(savings, 1),
            "tokens_per_char": round(per_token, 4),
            "advice": advice,
        }

    @property
    def nbytes(self) -> int:
        """Bytes held by the fingerprint tables (the bulk of the advisor's memory)."""
        return sum(t.chains.nbytes + t.chunks.nbytes for t in self._tables.values())
