"""The load board's Lua scripts and the parsing of their replies (router/loads.py explains
the scheme).

Each runs atomically in Redis, which is what makes a tenant's admission exact: no other
replica's script runs between the sum of the fleet's counts and the write of this replica's.
The scripts take no KEYS (they build key names from ARGV; every key shares the ``{prefix}``
hash tag), hence numkeys 0, as `router.index.redis.LuaScript` runs them.
"""

from __future__ import annotations

from typing import Any

# ARGV: tag, replica id, ttl (ms), n, version, then n (worker, count) pairs, then (tenant,
# count) pairs. Rewrites this replica's worker hash with the counts given; writes each tenant's
# count, and deletes the tenants not given, unless the stored count is newer than this
# snapshot (an admission that ran after it was taken); refreshes the TTLs. Returns the other
# live replicas' counts summed per worker and per tenant: {{worker, total, ...}, {tenant,
# total, ...}}. A replica whose hashes both expired is pruned from the set. HSET takes the
# worker pairs in slices: unpack has a stack limit.
PUBLISH = """
local tag, me, ttl, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local version = tonumber(ARGV[5])
local replicas = tag .. ':loads:replicas'
local wkey = tag .. ':loads:r:' .. me
local tkey, vkey = tag .. ':tenants:r:' .. me, tag .. ':tenants:v:' .. me
redis.call('DEL', wkey)
local last = 5 + 2 * n
for i = 6, last, 200 do
  redis.call('HSET', wkey, unpack(ARGV, i, math.min(last, i + 199)))
end
if n > 0 then
  redis.call('PEXPIRE', wkey, ttl)
end
local given = {}
for i = last + 1, #ARGV, 2 do
  local t = ARGV[i]
  given[t] = true
  if tonumber(redis.call('HGET', vkey, t) or 0) < version then
    redis.call('HSET', tkey, t, ARGV[i + 1])
    redis.call('HSET', vkey, t, version)
  end
end
for _, t in ipairs(redis.call('HKEYS', vkey)) do
  if not given[t] and tonumber(redis.call('HGET', vkey, t)) < version then
    redis.call('HDEL', tkey, t)
    redis.call('HDEL', vkey, t)
  end
end
redis.call('PEXPIRE', tkey, ttl)
redis.call('PEXPIRE', vkey, ttl)
redis.call('SADD', replicas, me)
local function add(totals, order, flat)
  for i = 1, #flat, 2 do
    local k = flat[i]
    if totals[k] == nil then
      totals[k] = 0
      order[#order + 1] = k
    end
    totals[k] = totals[k] + tonumber(flat[i + 1])
  end
end
local function flatten(totals, order)
  local out = {}
  for _, k in ipairs(order) do
    out[#out + 1] = k
    out[#out + 1] = totals[k]
  end
  return out
end
local wt, wo, tt, to = {}, {}, {}, {}
for _, r in ipairs(redis.call('SMEMBERS', replicas)) do
  if r ~= me then
    local workers = redis.call('HGETALL', tag .. ':loads:r:' .. r)
    local tenants = redis.call('HGETALL', tag .. ':tenants:r:' .. r)
    if #workers == 0 and #tenants == 0 then
      redis.call('SREM', replicas, r)
    else
      add(wt, wo, workers)
      add(tt, to, tenants)
    end
  end
end
return {flatten(wt, wo), flatten(tt, to)}
"""

# ARGV: tag, replica id, ttl (ms), tenant, limit, version, count. ``count`` is this replica's
# count of the tenant's requests (admitted or being admitted, this one included) when
# ``version`` was taken. If the stored snapshot is at least as new, it already includes this
# request: admit if the fleet's total is within the limit, else take this request back out.
# Otherwise admit if the others' total plus ``count`` is within the limit, and store
# ``count`` as this replica's. Returns {1 admitted or 0, the others' total}.
ADMIT = """
local tag, me, ttl, tenant = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local limit, version, count = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local replicas = tag .. ':loads:replicas'
local tkey, vkey = tag .. ':tenants:r:' .. me, tag .. ':tenants:v:' .. me
local others = 0
for _, r in ipairs(redis.call('SMEMBERS', replicas)) do
  if r ~= me then
    others = others + tonumber(redis.call('HGET', tag .. ':tenants:r:' .. r, tenant) or 0)
  end
end
if tonumber(redis.call('HGET', vkey, tenant) or 0) >= version then
  local mine = tonumber(redis.call('HGET', tkey, tenant) or 0)
  if others + mine <= limit then
    return {1, others}
  end
  if mine > 1 then
    redis.call('HINCRBY', tkey, tenant, -1)
  else
    redis.call('HDEL', tkey, tenant)
  end
  return {0, others}
end
if others + count > limit then
  return {0, others}
end
redis.call('HSET', tkey, tenant, count)
redis.call('HSET', vkey, tenant, version)
redis.call('PEXPIRE', tkey, ttl)
redis.call('PEXPIRE', vkey, ttl)
redis.call('SADD', replicas, me)
return {1, others}
"""

# ARGV: tag, replica id. A clean shutdown withdraws this replica's counts at once.
WITHDRAW = """
local tag, me = ARGV[1], ARGV[2]
redis.call('DEL', tag .. ':loads:r:' .. me, tag .. ':tenants:r:' .. me, tag .. ':tenants:v:' .. me)
redis.call('SREM', tag .. ':loads:replicas', me)
return 1
"""

# ARGV: tag, replica id, ttl (ms), version, then (tenant, count) pairs: this replica's counts
# of tenants whose requests ended, written (count 0: deleted) unless the stored count is newer.
# Sent soon after releases, so the other replicas see a freed slot at once, not at the next
# publish.
RELEASE = """
local tag, me, ttl, version = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local tkey, vkey = tag .. ':tenants:r:' .. me, tag .. ':tenants:v:' .. me
for i = 5, #ARGV, 2 do
  local t = ARGV[i]
  if tonumber(redis.call('HGET', vkey, t) or 0) < version then
    if ARGV[i + 1] == '0' then
      redis.call('HDEL', tkey, t)
      redis.call('HDEL', vkey, t)
    else
      redis.call('HSET', tkey, t, ARGV[i + 1])
      redis.call('HSET', vkey, t, version)
    end
  end
end
redis.call('PEXPIRE', tkey, ttl)
redis.call('PEXPIRE', vkey, ttl)
redis.call('SADD', tag .. ':loads:replicas', me)
return 1
"""


def parse_totals(flat: list[Any]) -> dict[str, int]:
    """``[name, count, ...]`` from the publish script as a mapping (counts below 1 dropped)."""
    totals: dict[str, int] = {}
    for i in range(0, len(flat) - 1, 2):
        name = flat[i]
        # Names are written by replicas as UTF-8; replace rather than fail on anything else.
        key = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
        count = int(flat[i + 1])
        if count > 0:
            totals[key] = count
    return totals
