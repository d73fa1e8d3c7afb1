"""Synthetic tenants: deterministic prompt heads, prefix versions and conversation text.

A tenant of an LLM service sends the same long head on every request (system prompt, tool
schemas, few-shot examples) followed by a conversation that grows turn by turn. That shared
head is what a prefix cache can reuse, and what a cache-aware router must keep warm on one
worker. Everything here is built from a seeded RNG over a built-in word list, so a trace is
reproducible byte for byte on any machine and needs no downloads.

A head is a sequence of *units* (system-prompt paragraphs, tool schemas, few-shot pairs).
A new prefix version rewrites the head from a cut unit onwards, so versions share a leading
prefix and differ after it, as a redeploy of a prompt template does in production.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

# About 330 plain English words: enough variety that heads do not collapse into repeats,
# short enough to live in the source. ~6 bytes per word with its space, so ~1.5 tokens each
# for a tokenizer that counts one token per 4 bytes.
WORDS: tuple[str, ...] = tuple(
    """
    account action address agent alert amount answer apply archive area argument array
    asset audit author balance batch bill block board body booking branch budget buffer
    build bundle cache calendar call campaign capacity card carrier case catalog category
    change channel charge check claim class client cluster code column comment commit
    company config contact container content context contract control count coupon credit
    currency customer cycle daily dashboard data date deadline debit default delivery
    deploy deposit design detail device digest discount dispatch document domain draft
    driver due edge email employee endpoint entry error estimate event exchange expense
    export factor feature fee field file filter flag flight folder form format forward
    frame fund gateway grant graph group guide handler header health history hold host
    hotel hour image import incident index invoice issue item job journal key label
    language launch layer ledger level library limit line link list load locale lock log
    loyalty manager manifest margin market match member memo menu merchant message method
    metric milestone mode model module month network node note notice number offer office
    order origin owner package page panel parcel partner password patch path payment
    payroll period permit phase plan platform policy pool port portal position post price
    priority process product profile project promo property provider quota quote range
    rate reason receipt record refund region release report request reserve resource
    response result return review reward role route rule sale sample schedule schema scope
    score screen search season section segment seller sensor server service session
    setting share shift shipment signal site size slot source spec stage state status
    step stock storage store stream subject summary supplier support survey switch system
    table tag target task tax team template tenant term test thread ticket tier time title
    token topic total track trade transfer trial trip type unit update upload usage user
    value vendor version view visit volume voucher wallet warehouse week window workflow
    accurate active annual automatic available basic brief careful central clear common
    complete correct current direct early exact external final formal full general global
    internal large late local main manual minor monthly new next normal official open
    optional partial pending primary prior private public quick recent regular remote
    secure short simple single small special standard strict temporary total urgent valid
    always carefully clearly directly first never only politely quickly then usually
    """.split()
)
TOOL_TYPES: tuple[str, ...] = ("string", "integer", "number", "boolean")
BYTES_PER_TOKEN = 4
"""The simulator's tokenizer (and roughly real BPE on English) counts ~4 bytes per token."""

# How a head's bytes are split between its parts, and the typical size of one unit of each.
_SYSTEM_SHARE, _TOOLS_SHARE = 0.4, 0.3
_PARAGRAPH_BYTES, _TOOL_BYTES, _SHOT_BYTES = 600, 700, 600


@dataclass(frozen=True, slots=True)
class Tenant:
    """One synthetic tenant: identity, credentials and the shape of its prompt head."""

    id: str
    api_key: str
    seed: str
    """Root of every RNG for this tenant's text (the run seed plus the tenant id)."""
    head_tokens: int
    """Approximate size of the head in tokens (the rendered text is ~4x as many bytes)."""
    text_id: str = ""
    """Whose text the tenant writes (its own id unless tenants share text in groups)."""

    @property
    def system_units(self) -> int:
        return max(1, round(_SYSTEM_SHARE * self.head_bytes / _PARAGRAPH_BYTES))

    @property
    def tool_units(self) -> int:
        return max(1, round(_TOOLS_SHARE * self.head_bytes / _TOOL_BYTES))

    @property
    def shot_units(self) -> int:
        shares = 1.0 - _SYSTEM_SHARE - _TOOLS_SHARE
        return max(1, round(shares * self.head_bytes / _SHOT_BYTES))

    @property
    def head_bytes(self) -> int:
        return self.head_tokens * BYTES_PER_TOKEN

    @property
    def units(self) -> int:
        return self.system_units + self.tool_units + self.shot_units


def make_tenants(
    count: int,
    *,
    seed: int,
    head_tokens: tuple[int, int] = (1500, 3000),
    key_prefix: str = "sk-demo-",
    text_groups: int = 0,
) -> list[Tenant]:
    """``count`` tenants ``t00, t01, ...`` (rank order = popularity order) with seeded sizes.

    With ``text_groups`` > 0, tenant ``i`` writes exactly the text of group ``i % text_groups``
    (same seed, size and wording): distinct tenants, identical prompts.
    """
    if count < 1:
        raise ValueError("need at least one tenant")
    low, high = head_tokens
    if not 0 < low <= high:
        raise ValueError(f"bad head_tokens range {head_tokens}")
    rng = random.Random(f"{seed}|tenants")
    width = max(2, len(str(count - 1)))
    tenants = []
    sizes = [rng.randint(low, high) for _ in range(count)]
    for i in range(count):
        tid = f"t{i:0{width}d}"
        if text_groups > 0:
            group = f"g{i % text_groups:0{width}d}"
            size = sizes[i % text_groups]
            tenants.append(Tenant(tid, f"{key_prefix}{tid}", f"{seed}|{group}", size, group))
        else:
            tenants.append(Tenant(tid, f"{key_prefix}{tid}", f"{seed}|{tid}", sizes[i]))
    return tenants


def zipf_weights(count: int, exponent: float) -> list[float]:
    """Normalised Zipf popularity: rank k (1-based) gets weight proportional to 1 / k**s."""
    raw = [1.0 / (rank**exponent) for rank in range(1, count + 1)]
    total = sum(raw)
    return [w / total for w in raw]


# --- text -----------------------------------------------------------------------------------


def sentence(rng: random.Random, words: int) -> str:
    """A pseudo-English sentence of ``words`` words."""
    picked = [rng.choice(WORDS) for _ in range(max(1, words))]
    text = " ".join(picked)
    return text[0].upper() + text[1:] + rng.choice((".", ".", ".", "?", ";"))


def prose(rng: random.Random, approx_bytes: int) -> str:
    """Sentences until about ``approx_bytes`` bytes of text."""
    parts: list[str] = []
    size = 0
    while size < approx_bytes - 50:  # stop short: the last sentence overshoots
        s = sentence(rng, rng.randint(6, 18))
        parts.append(s)
        size += len(s) + 1
    return " ".join(parts)


def _identifier(rng: random.Random, parts: int) -> str:
    return "_".join(rng.choice(WORDS) for _ in range(parts))


def tool_schema(rng: random.Random, approx_bytes: int) -> dict[str, Any]:
    """An OpenAI-style function tool schema with seeded names and descriptions."""
    properties: dict[str, Any] = {}
    size = 0
    while size < approx_bytes * 0.45 or len(properties) < 2:
        name = _identifier(rng, 2)
        kind = rng.choice(TOOL_TYPES)
        desc = sentence(rng, rng.randint(5, 12))
        properties[name] = {"type": kind, "description": desc}
        size += len(name) + len(desc) + 40
    required = sorted(rng.sample(sorted(properties), k=max(1, len(properties) // 2)))
    return {
        "type": "function",
        "function": {
            "name": _identifier(rng, 3),
            "description": prose(rng, int(approx_bytes * 0.2)),
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


# --- heads and versions ---------------------------------------------------------------------


def version_cut(tenant: Tenant, version: int) -> int:
    """The first head unit that version ``version`` (>= 1) rewrites; units before it stay."""
    if version < 1:
        raise ValueError("version 0 is the original head; cuts start at version 1")
    rng = random.Random(f"{tenant.seed}|cut|{version}")
    return rng.randrange(1, tenant.units) if tenant.units > 1 else 0


def unit_generation(tenant: Tenant, unit: int, version: int) -> int:
    """The latest version <= ``version`` whose rewrite covered ``unit`` (0 if none did)."""
    generation = 0
    for v in range(1, version + 1):
        if version_cut(tenant, v) <= unit:
            generation = v
    return generation


def _unit_rng(tenant: Tenant, unit: int, version: int) -> random.Random:
    return random.Random(f"{tenant.seed}|unit|{unit}|{unit_generation(tenant, unit, version)}")


@dataclass(frozen=True, slots=True)
class Head:
    """A tenant's prompt head at one prefix version."""

    tenant: str
    version: int
    system: str
    """The system message: instructions, then the tool schemas as JSON lines."""
    shots: tuple[tuple[str, str], ...]
    """Few-shot examples as (user, assistant) pairs."""

    def messages(self) -> list[dict[str, str]]:
        """The chat head: the system message, then the few-shot pairs as turns."""
        messages = [{"role": "system", "content": self.system}]
        for question, answer in self.shots:
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer})
        return messages

    def text(self) -> str:
        """The same head rendered as one plain prompt, for ``/v1/completions``."""
        return self.system + "".join(f"\n\nQ: {q}\nA: {a}" for q, a in self.shots)


def build_head(tenant: Tenant, version: int) -> Head:
    """Render ``tenant``'s head at ``version`` (pure; callers cache it if they reuse it)."""
    unit = 0
    paragraphs = []
    for _ in range(tenant.system_units):
        rng = _unit_rng(tenant, unit, version)
        text = prose(rng, _PARAGRAPH_BYTES)
        if unit == 0:
            org = " ".join(rng.choice(WORDS) for _ in range(2)).title()
            text = f"You are the assistant of {org} (tenant {tenant.text_id or tenant.id}). {text}"
        paragraphs.append(text)
        unit += 1
    tools = []
    for _ in range(tenant.tool_units):
        tools.append(json.dumps(tool_schema(_unit_rng(tenant, unit, version), _TOOL_BYTES)))
        unit += 1
    shots = []
    for _ in range(tenant.shot_units):
        rng = _unit_rng(tenant, unit, version)
        question = prose(rng, _SHOT_BYTES // 3)
        answer = prose(rng, 2 * _SHOT_BYTES // 3)
        shots.append((question, answer))
        unit += 1
    # Tool schemas are written into the system text (as many applications do) rather than
    # the `tools` field, so every renderer puts them at the same place in the prompt.
    system = "\n\n".join(paragraphs)
    system += "\n\n# Tools\nCall a function by answering with a JSON object. Functions:\n"
    system += "\n".join(tools)
    return Head(tenant.id, version, system, tuple(shots))


def user_tail(rng: random.Random) -> str:
    """A varied user message: mostly a short question, sometimes a pasted document."""
    kind = rng.random()
    if kind < 0.6:
        return sentence(rng, rng.randint(8, 30))
    if kind < 0.9:
        return prose(rng, rng.randint(200, 700))
    lines = [f"{_identifier(rng, 2)}: {rng.randint(0, 99999)}" for _ in range(rng.randint(20, 60))]
    return sentence(rng, 10) + "\n" + "\n".join(lines)


def assistant_reply(rng: random.Random) -> str:
    """A plausible earlier assistant answer to keep in a conversation's history."""
    return prose(rng, rng.randint(120, 600))
