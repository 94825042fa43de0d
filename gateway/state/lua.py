"""The Lua scripts of the Redis state store: each is one update that must be atomic across
replicas. Every key a script touches carries one hash tag, so it also runs on Redis Cluster."""

# KEYS: the record, the current window bucket, then the window's other buckets (read for
# the failure share: a breaker trips on consecutive failures only when they are also at
# least ARGV[11] of the window's outcomes, so a flaky provider is failed over, not shut).
# ARGV[12] is when the attempt started ('' for now), ARGV[13] '1' if it was the half-open
# probe: only an attempt started since the last transition (changed_at) moves the breaker,
# and while it is open only the probe that started half-open (at or after open_until, not
# one taken on a stale view of it); the rest count in the window only.
RECORD = """
local rec, win = KEYS[1], KEYS[2]
local now = tonumber(ARGV[5])
local fields = redis.call('HMGET', rec, 'state', 'changed_at', 'open_until')
local state = fields[1] or 'closed'
local started = tonumber(ARGV[12]) or now
local probe = ARGV[13] == '1' and started >= (tonumber(fields[3] or '') or 0)
local moves = started >= (tonumber(fields[2] or '') or 0) and (state ~= 'open' or probe)
if ARGV[1] == '1' then
  redis.call('HINCRBY', win, 'ok', 1)
  local lat = tonumber(ARGV[2])
  if lat >= 0 then
    redis.call('HINCRBY', win, 'h' .. ARGV[3], 1)
    local alpha = tonumber(ARGV[9])
    local ewma = tonumber(redis.call('HGET', rec, 'ewma') or '')
    if ewma then ewma = alpha * lat + (1 - alpha) * ewma else ewma = lat end
    redis.call('HSET', rec, 'ewma', string.format('%.17g', ewma))
  end
  if moves then
    if state == 'open' then
      redis.call('HSET', rec, 'recovered_at', ARGV[5], 'changed_at', ARGV[5])
    end
    redis.call('HSET', rec, 'state', 'closed', 'consec', 0, 'opened', 0, 'open_until', 0)
  end
else
  redis.call('HINCRBY', win, 'fail', 1)
  redis.call('HSET', rec, 'last_error', ARGV[4])
  if moves then
    local consec = redis.call('HINCRBY', rec, 'consec', 1)
    local trip = state == 'open'  -- a failed probe re-opens with a longer backoff
    if not trip and consec >= tonumber(ARGV[6]) then
      local ok, fail = 0, 0
      for i = 2, #KEYS do
        local counts = redis.call('HMGET', KEYS[i], 'ok', 'fail')
        ok, fail = ok + (tonumber(counts[1]) or 0), fail + (tonumber(counts[2]) or 0)
      end
      trip = fail >= tonumber(ARGV[11]) * (ok + fail)
    end
    if trip then
      local opened = redis.call('HINCRBY', rec, 'opened', 1)
      local backoff = math.min(tonumber(ARGV[8]), tonumber(ARGV[7]) * 2 ^ (opened - 1))
      redis.call('HSET', rec, 'state', 'open', 'changed_at', ARGV[5],
        'open_until', string.format('%.17g', now + backoff))
    end
  end
end
redis.call('EXPIRE', win, ARGV[10])
return 1
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

COOLDOWN = """
local current = tonumber(redis.call('HGET', KEYS[1], 'cooldown_until') or '0')
if tonumber(ARGV[1]) > current then redis.call('HSET', KEYS[1], 'cooldown_until', ARGV[1]) end
return 1
"""

HEDGE = """
local req = tonumber(redis.call('HGET', KEYS[1], 'req') or '0')
local hedged = tonumber(redis.call('HGET', KEYS[1], 'hedge') or '0')
if hedged >= math.floor(tonumber(ARGV[1]) * req) + tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], 'hedge', 1)
redis.call('EXPIRE', KEYS[1], 180)
return 1
"""

# A claim: the fingerprint of the request that holds the key, its state (pending or done),
# its owner (a token of the claimant's run), the claimant's lease (renewed while it runs)
# and its journal of provider jobs ("job:<i>"). A pending claim whose lease ran out is taken
# over, journal and all, by the same request, which becomes its owner: the claimant's
# renewals, notes, finish and release then fail, so it can no longer overwrite or free the
# claim. Leases are read off Redis's clock (TIME), never a replica's own.
IDEM_BEGIN = """
local k = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease_ms, keep_ms = tonumber(ARGV[2]), tonumber(ARGV[4])
if redis.call('EXISTS', k) == 0 then
  redis.call('HSET', k, 'fp', ARGV[1], 'state', 'pending', 'owner', ARGV[5],
    'lease_until', now + lease_ms / 1000)
  redis.call('PEXPIRE', k, lease_ms + keep_ms)
  return {'new', ''}
end
if redis.call('HGET', k, 'fp') ~= ARGV[1] then return {'conflict', ''} end
if redis.call('HGET', k, 'state') == 'done' then
  return {'done', redis.call('HGET', k, 'response')}
end
if tonumber(redis.call('HGET', k, 'lease_until')) > now then return {'pending', ''} end
redis.call('HSET', k, 'lease_until', now + lease_ms / 1000, 'owner', ARGV[5])
redis.call('PEXPIRE', k, lease_ms + keep_ms)
local out = {'takeover', ''}
local fields = redis.call('HGETALL', k)
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 4) == 'job:' then
    table.insert(out, fields[i])
    table.insert(out, fields[i + 1])
  end
end
return out
"""

# The claim, if it is still pending for this request and owned by this run (ARGV[1], [2]).
_OWNED = """
local fp, state, owner = unpack(redis.call('HMGET', KEYS[1], 'fp', 'state', 'owner'))
if fp ~= ARGV[1] or state ~= 'pending' or (owner or '') ~= ARGV[2] then return 0 end
"""

# Renew the owner's lease (ARGV[3] ms, and the claim's life ARGV[4] ms past it).
IDEM_RENEW = (
    _OWNED
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', KEYS[1], 'lease_until', now + tonumber(ARGV[3]) / 1000)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + tonumber(ARGV[4]))
return 1
"""
)

# Note a provider job in the owner's journal.
IDEM_NOTE = (
    _OWNED
    + """
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
return 1
"""
)

IDEM_FINISH = (
    _OWNED
    + """
redis.call('HSET', KEYS[1], 'state', 'done', 'response', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""
)

IDEM_RELEASE = (
    _OWNED
    + """
return redis.call('DEL', KEYS[1])
"""
)

# Drop a done claim, only while it still holds the response that was read (ARGV[2]): a
# cache entry whose files are gone, not one refilled meanwhile.
IDEM_DROP = """
local fp, state, response = unpack(redis.call('HMGET', KEYS[1], 'fp', 'state', 'response'))
if fp ~= ARGV[1] or state ~= 'done' or response ~= ARGV[2] then return 0 end
return redis.call('DEL', KEYS[1])
"""


# A client key's admission: leases of requests in flight (each holding what it may cost),
# the GCRA emission time for requests a minute, and spend today and this month. Holds the
# worst case (ARGV[3]) if it fits the budgets, else the cheapest plan (ARGV[11]) if that
# does; refuses with the limit's name and the seconds until it would admit.
ADMIT = """
local now = tonumber(ARGV[1])
local entries = redis.call('HGETALL', KEYS[1])
local count, held = 0, 0
for i = 1, #entries, 2 do
  local amount, ends = string.match(entries[i + 1], '^(%d+):(.+)$')
  if tonumber(ends) <= now then
    redis.call('HDEL', KEYS[1], entries[i])
  else
    count, held = count + 1, held + tonumber(amount)
  end
end
local maxc = tonumber(ARGV[8])
if maxc > 0 and count >= maxc then return {'max_concurrent', '1', '0'} end
local rpm, emission = tonumber(ARGV[7]), nil
if rpm > 0 then
  emission = math.max(tonumber(redis.call('GET', KEYS[2]) or '0'), now) + 60 / rpm
  if emission - now > 60 then
    return {'requests_per_minute', tostring(emission - now - 60), '0'}
  end
end
local perday, permonth = tonumber(ARGV[5]), tonumber(ARGV[6])
local day = tonumber(redis.call('HGET', KEYS[3], 'micros') or '0')
local month = tonumber(redis.call('HGET', KEYS[4], 'micros') or '0')
local function fits(hold)
  if perday >= 0 and day + held + hold > perday then return 'usd_per_day' end
  if permonth >= 0 and month + held + hold > permonth then return 'usd_per_month' end
  return ''
end
local hold = tonumber(ARGV[3])
local refused = fits(hold)
if refused ~= '' then
  hold = tonumber(ARGV[11])
  refused = fits(hold)
  if refused == 'usd_per_day' then return {refused, ARGV[9], '0'} end
  if refused == 'usd_per_month' then return {refused, ARGV[10], '0'} end
end
if emission then redis.call('SET', KEYS[2], tostring(emission), 'EX', 120) end
redis.call('HSET', KEYS[1], ARGV[2], string.format('%d:%s', hold, ARGV[4]))
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[4]) - now) + 60)
return {'', '0', tostring(hold)}
"""

# ADMIT's first two checks, read-only: a request refused by them is refused before its body
# is read. Stale leases are left for ADMIT to delete.
PRECHECK = """
local now = tonumber(ARGV[1])
local maxc = tonumber(ARGV[3])
if maxc > 0 then
  local count = 0
  for _, entry in ipairs(redis.call('HVALS', KEYS[1])) do
    if tonumber(string.match(entry, '^%d+:(.+)$')) > now then count = count + 1 end
  end
  if count >= maxc then return {'max_concurrent', '1'} end
end
local rpm = tonumber(ARGV[2])
if rpm > 0 then
  local emission = math.max(tonumber(redis.call('GET', KEYS[2]) or '0'), now) + 60 / rpm
  if emission - now > 60 then return {'requests_per_minute', tostring(emission - now - 60)} end
end
return {'', '0'}
"""

# An admitted request's hold grows to ARGV[3] (a failover may bill more than its first
# plan) if the budgets still fit it beside the other holds, and its lease is renewed (to
# ARGV[4]); a settled ticket (KEYS[4]) is left alone.
EXTEND = """
if redis.call('EXISTS', KEYS[4]) == 1 then return 1 end
local now, amount = tonumber(ARGV[1]), tonumber(ARGV[3])
local entries = redis.call('HGETALL', KEYS[1])
local others, mine = 0, -1
for i = 1, #entries, 2 do
  local held, ends = string.match(entries[i + 1], '^(%d+):(.+)$')
  if tonumber(ends) > now then
    if entries[i] == ARGV[2] then mine = tonumber(held) else others = others + tonumber(held) end
  end
end
if amount > mine then
  local day = tonumber(redis.call('HGET', KEYS[2], 'micros') or '0')
  local month = tonumber(redis.call('HGET', KEYS[3], 'micros') or '0')
  local perday, permonth = tonumber(ARGV[5]), tonumber(ARGV[6])
  if perday >= 0 and day + others + amount > perday then return 0 end
  if permonth >= 0 and month + others + amount > permonth then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[2], string.format('%d:%s', math.max(amount, mine), ARGV[4]))
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[4]) - now) + 60)
return 1
"""

# Idempotent per ticket (KEYS[4] remembers it), so a retry after a lost reply counts once.
# KEYS[5..]: a marker per provider job (in the account's slot), set here if absent: the job's
# amount and counters are added only then, in the same step as the ledger entry, so no
# replica can die between marking a job billed and charging it. ARGV: ticket, micros, the
# number of counter pairs and the pairs; per job its micros, pair count and pairs; last,
# how long a job marker lives. Answers {1, fresh per job}, or {0} if already settled.
SETTLE = """
if not redis.call('SET', KEYS[4], '1', 'NX', 'EX', 172800) then return {0} end
redis.call('HDEL', KEYS[1], ARGV[1])
local micros = tonumber(ARGV[2])
local a = 4
for _ = 1, tonumber(ARGV[3]) do
  redis.call('HINCRBY', KEYS[2], ARGV[a], ARGV[a + 1])
  a = a + 2
end
local out = {1}
for j = 5, #KEYS do
  local amount, n = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  local fresh = redis.call('SET', KEYS[j], '1', 'NX', 'EX', ARGV[#ARGV])
  if fresh then
    micros = micros + amount
    for _ = 1, n do
      redis.call('HINCRBY', KEYS[2], ARGV[a], ARGV[a + 1])
      a = a + 2
    end
  else
    a = a + 2 * n
  end
  table.insert(out, fresh and 1 or 0)
end
redis.call('HINCRBY', KEYS[2], 'micros', micros)
redis.call('HINCRBY', KEYS[3], 'micros', micros)
redis.call('EXPIRE', KEYS[2], 400 * 86400)
redis.call('EXPIRE', KEYS[3], 400 * 86400)
return out
"""
