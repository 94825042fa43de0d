"""The Lua scripts of the Redis state store: each is one update that must be atomic across
replicas. Every key a script touches carries one hash tag, so it also runs on Redis Cluster."""

# KEYS: the record, the current window bucket, then the window's other buckets (read for
# the failure share: a breaker trips on consecutive failures only when they are also at
# least ARGV[11] of the window's outcomes, so a flaky provider is failed over, not shut).
RECORD = """
local rec, win = KEYS[1], KEYS[2]
local now = tonumber(ARGV[5])
local state = redis.call('HGET', rec, 'state') or 'closed'
if ARGV[1] == '1' then
  redis.call('HINCRBY', win, 'ok', 1)
  local lat = tonumber(ARGV[2])
  if lat >= 0 then
    redis.call('HINCRBY', win, 'h' .. ARGV[3], 1)
    local alpha = tonumber(ARGV[9])
    local ewma = tonumber(redis.call('HGET', rec, 'ewma') or '')
    if ewma then ewma = alpha * lat + (1 - alpha) * ewma else ewma = lat end
    redis.call('HSET', rec, 'ewma', tostring(ewma))
  end
  if state == 'open' then redis.call('HSET', rec, 'recovered_at', ARGV[5]) end
  redis.call('HSET', rec, 'state', 'closed', 'consec', 0, 'opened', 0, 'open_until', 0)
else
  redis.call('HINCRBY', win, 'fail', 1)
  local consec = redis.call('HINCRBY', rec, 'consec', 1)
  redis.call('HSET', rec, 'last_error', ARGV[4])
  local trip = state == 'open'
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
    redis.call('HSET', rec, 'state', 'open', 'open_until', tostring(now + backoff))
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
# the claimant's lease (renewed while it runs) and its journal of provider jobs ("job:<i>").
# A pending claim whose lease ran out is taken over, journal and all, by the same request.
IDEM_BEGIN = """
local k, now = KEYS[1], tonumber(ARGV[3])
local lease_ms, keep_ms = tonumber(ARGV[2]), tonumber(ARGV[4])
if redis.call('EXISTS', k) == 0 then
  redis.call('HSET', k, 'fp', ARGV[1], 'state', 'pending', 'lease_until', now + lease_ms / 1000)
  redis.call('PEXPIRE', k, lease_ms + keep_ms)
  return {'new', ''}
end
if redis.call('HGET', k, 'fp') ~= ARGV[1] then return {'conflict', ''} end
if redis.call('HGET', k, 'state') == 'done' then
  return {'done', redis.call('HGET', k, 'response')}
end
if tonumber(redis.call('HGET', k, 'lease_until')) > now then return {'pending', ''} end
redis.call('HSET', k, 'lease_until', now + lease_ms / 1000)
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

# Renew a running claimant's lease, or note a provider job in its journal.
IDEM_PENDING_SET = """
local fp, state = unpack(redis.call('HMGET', KEYS[1], 'fp', 'state'))
if fp ~= ARGV[1] or state ~= 'pending' then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
if ARGV[4] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return 1
"""

IDEM_FINISH = """
if redis.call('HGET', KEYS[1], 'fp') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'done', 'response', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

IDEM_RELEASE = """
local fp, state = unpack(redis.call('HMGET', KEYS[1], 'fp', 'state'))
if fp == ARGV[1] and state == 'pending' then return redis.call('DEL', KEYS[1]) end
return 0
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

# Idempotent per ticket (KEYS[4] remembers it), so a retry after a lost reply counts once.
SETTLE = """
if not redis.call('SET', KEYS[4], '1', 'NX', 'EX', 172800) then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local micros = tonumber(ARGV[2])
redis.call('HINCRBY', KEYS[2], 'micros', micros)
redis.call('HINCRBY', KEYS[3], 'micros', micros)
for i = 3, #ARGV, 2 do redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[2], 400 * 86400)
redis.call('EXPIRE', KEYS[3], 400 * 86400)
return 1
"""
