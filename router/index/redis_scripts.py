"""The Lua scripts of the Redis warm index (`router.index.redis`), one per operation.

Each runs as one ``EVALSHA`` with no KEYS (key names are built from the ``{prefix}`` hash tag
passed in ARGV), so an operation is one round trip and atomic. The key layout and why lookups
stay exact are explained in `router.index.redis`'s docstring; the comment above each script
gives its ARGV and reply.
"""

from __future__ import annotations

# Shared by the scripts: split the chain (16 hex digits per block, on demand); run bulk
# commands in slices small enough for Lua's unpack() limit; keep a hash in Redis's hashtable
# encoding. A small hash is otherwise a listpack (up to hash-max-listpack-entries, 128 to 512
# depending on the build), where HMGET scans the whole hash for every field asked, and a
# missing field, the common case in a lookup, costs the most. A value longer than
# hash-max-listpack-value converts the hash for good (Redis never converts back, and an RDB
# load keeps it a hashtable since the value still does not fit).
PRELUDE = """
local function extend(blocks, hex, upto)
  for i = #blocks + 1, upto do blocks[i] = string.sub(hex, 16 * i - 15, 16 * i) end
  return blocks
end
local function bulk(cmd, key, list)
  for i = 1, #list, 1000 do
    redis.call(cmd, key, unpack(list, i, math.min(i + 999, #list)))
  end
end
local WIDE = string.rep('~', 1024)
local function hashtable(key) redis.call('HSETNX', key, '~', WIDE) end
"""

# ARGV: tag, now, chain hex, marks (1-based positions of the chain's marked blocks, ascending,
# space-separated). Returns "depth length worker ..." (`_depths` parses it) for every worker
# with depth >= 1: one string, since the client parses a single bulk reply several times
# faster than an array of two elements per worker.
# Candidates are the workers holding the chain's head. For each, the deepest mark whose claim
# still holds proves the run up to it (see the module doc); only the blocks after it are read
# from the expiry hash, in growing slices ending first at the next mark.
LOOKUP = (
    PRELUDE
    + """
local tag, now, hex, marks = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local n = #hex / 16
local cache = {}
local function block(i)
  local b = cache[i]
  if not b then
    b = string.sub(hex, 16 * i - 15, 16 * i)
    cache[i] = b
  end
  return b
end
local candidates = redis.call('SMEMBERS', tag .. ':h:' .. block(1))
if #candidates == 0 then return '' end
local at, probes = {}, {}
for p in string.gmatch(marks, '%d+') do
  local i = tonumber(p)
  at[#at + 1] = i
  probes[#probes + 1] = block(i)
end
probes[#probes + 1] = 'g'
local function valid(e) return e == 'inf' or (e and tonumber(e) > now) end
local out = {}
for _, w in ipairs(candidates) do
  -- Blocks 1..sure are proved warm by a claim; the scan starts after them.
  local sure, nxt = 0, 1
  if #at > 0 then
    local claims = redis.call('HMGET', tag .. ':c:' .. w, unpack(probes))
    local gen = claims[#probes] or '0'
    for j = #at, 1, -1 do
      local c = claims[j]
      if c then
        local g, len, x = string.match(c, '^(%d+) (%d+) (%S+)$')
        if g == gen and tonumber(len) == at[j] and valid(x) then
          sure, nxt = at[j], j + 1
          break
        end
      end
    end
  end
  local depth = sure
  if depth < n then
    local ekey = tag .. ':e:' .. w
    local size = 32
    while depth < n do
      -- The first slice ends at the next mark: a claim there failed, so the run likely ends
      -- before it; later slices grow.
      local last = math.min(n, depth + size)
      if depth == sure and at[nxt] then last = math.max(at[nxt], math.min(n, depth + 8)) end
      local list = {}
      for i = depth + 1, last do list[i - depth] = block(i) end
      local expiry = redis.call('HMGET', ekey, unpack(list))
      local run = 0
      for j = 1, #list do
        if not valid(expiry[j]) then break end
        run = j
      end
      depth = depth + run
      if depth < last then break end
      size = math.min(size * 2, 1024)
    end
  end
  if depth > 0 then out[#out + 1] = depth .. ' ' .. #w .. ' ' .. w end
end
return table.concat(out, ' ')
"""
)

# Forget worker w's blocks in `list` everywhere but its LRU zset (the caller removes them
# there): their expiries, and the head entries of those that were heads.
FORGET = """
local function forget(tag, w, list)
  if #list == 0 then return end
  bulk('HDEL', tag .. ':e:' .. w, list)
  local marked = {}
  for i = 1, #list do
    if string.byte(list[i], 16) == 48 then marked[#marked + 1] = list[i] end
  end
  if #marked > 0 then bulk('HDEL', tag .. ':c:' .. w, marked) end
  local hwkey = tag .. ':hw:' .. w
  for i = 1, #list, 1000 do
    local last = math.min(i + 999, #list)
    local heads = redis.call('SMISMEMBER', hwkey, unpack(list, i, last))
    for j = 1, last - i + 1 do
      if heads[j] == 1 then
        redis.call('SREM', tag .. ':h:' .. list[i + j - 1], w)
        redis.call('SREM', hwkey, list[i + j - 1])
      end
    end
  end
end
"""

# ARGV: tag, worker, expiry ("inf" when confirmed), capacity, chain hex. Returns the worker's
# block count. Never shortens an expiry (a prediction does not demote a confirmed block), then
# evicts the least recent blocks beyond capacity.
RECORD = (
    PRELUDE
    + FORGET
    + """
local tag, w, expiry, cap, hex = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local n = #hex / 16
local blocks = extend({}, hex, n)
local zkey, ekey, ckey = tag .. ':w:' .. w, tag .. ':e:' .. w, tag .. ':c:' .. w
local gen = redis.call('HGET', ckey, 'g') or '0'
local fields, claims = {}, {}
-- A claim on each marked block: "gen length expiry", the run from this record's first block
-- to it held, every block's expiry at least the claim's (the least along the run so far).
local function claim(i, least)
  if string.byte(hex, 16 * i) == 48 then
    claims[#claims + 1] = blocks[i]
    claims[#claims + 1] = gen .. ' ' .. i .. ' ' .. least
  end
end
if expiry == 'inf' then
  for i = 1, n do
    fields[2 * i - 1] = blocks[i]
    fields[2 * i] = 'inf'
    claim(i, 'inf')
  end
else
  local until_n = tonumber(expiry)
  local least, least_n = 'inf', math.huge
  for i = 1, n, 1000 do
    local last = math.min(i + 999, n)
    local current = redis.call('HMGET', ekey, unpack(blocks, i, last))
    for j = 1, last - i + 1 do
      local e = current[j]
      if not e or (e ~= 'inf' and tonumber(e) < until_n) then
        fields[#fields + 1] = blocks[i + j - 1]
        fields[#fields + 1] = expiry
        e = expiry
      end
      if e ~= 'inf' and tonumber(e) < least_n then least, least_n = e, tonumber(e) end
      claim(i + j - 1, least)
    end
  end
end
hashtable(ekey)
if #fields > 0 then bulk('HSET', ekey, fields) end
if #claims > 0 then
  hashtable(ckey)
  bulk('HSET', ckey, claims)
end
-- Tail first: the head gets the highest recency, so it is evicted last.
local top = redis.call('INCRBY', tag .. ':seq', n)
local ranked = {}
for i = 1, n do
  ranked[2 * i - 1] = top - i + 1
  ranked[2 * i] = blocks[i]
end
bulk('ZADD', zkey, ranked)
redis.call('SADD', tag .. ':h:' .. blocks[1], w)
redis.call('SADD', tag .. ':hw:' .. w, blocks[1])
redis.call('SADD', tag .. ':workers', w)
local count = redis.call('ZCARD', zkey)
if count > cap then
  local victims = redis.call('ZRANGE', zkey, 0, count - cap - 1)
  redis.call('ZREMRANGEBYRANK', zkey, 0, count - cap - 1)
  forget(tag, w, victims)
  count = cap
end
return count
"""
)

# ARGV: tag, worker, hex of the blocks. Returns the worker's block count left, or -1 for a
# worker the index does not know (so stats do not grow an entry for it).
REMOVE = (
    PRELUDE
    + FORGET
    + """
local tag, w, hex = ARGV[1], ARGV[2], ARGV[3]
if redis.call('SISMEMBER', tag .. ':workers', w) == 0 then return -1 end
local blocks = extend({}, hex, #hex / 16)
local zkey = tag .. ':w:' .. w
local removed = 0
for i = 1, #blocks, 1000 do
  removed = removed + redis.call('ZREM', zkey, unpack(blocks, i, math.min(i + 999, #blocks)))
end
if removed > 0 then
  -- A hole may now sit inside runs that claims vouch for: void every claim of the worker.
  redis.call('HINCRBY', tag .. ':c:' .. w, 'g', 1)
  forget(tag, w, blocks)
end
return redis.call('ZCARD', zkey)
"""
)

# ARGV: tag, worker. Costs the worker's number of heads, not of blocks.
CLEAR = """
local tag, w = ARGV[1], ARGV[2]
local hwkey = tag .. ':hw:' .. w
for _, head in ipairs(redis.call('SMEMBERS', hwkey)) do
  redis.call('SREM', tag .. ':h:' .. head, w)
end
redis.call('DEL', tag .. ':w:' .. w, tag .. ':e:' .. w, tag .. ':c:' .. w, hwkey)
redis.call('SREM', tag .. ':workers', w)
return 1
"""

# ARGV: tag. Returns {worker, blocks, ...}.
STATS = """
local tag = ARGV[1]
local out = {}
for _, w in ipairs(redis.call('SMEMBERS', tag .. ':workers')) do
  out[#out + 1] = w
  out[#out + 1] = redis.call('ZCARD', tag .. ':w:' .. w)
end
return out
"""
