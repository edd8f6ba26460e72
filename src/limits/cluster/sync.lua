-- One lane's sync with the limits its instances share, in one round trip.
-- KEYS: 1 instances (zset id -> expiry ms), 2..5 the GCRA state (theoretical arrival
-- time, ms) of rpm, tpm, input_tpm, output_tpm, 6 holds on calls in flight (hash
-- id -> "held:wanted:expiry"), 7 the pause (expiry ms).
-- ARGV: 1 instance id, 2 lease ms, 3 horizon ms, 4..7 limits per minute (0: none),
-- 8..11 units wanted, 12 cap on calls in flight (0: none), 13 calls wanted,
-- 14 calls in flight now.
-- Returns: instances seen, then for each rate the units granted and when the first is
-- due (µs from now; for none granted, when the rate has more), then the calls in
-- flight this instance may have, then the pause left (ms, 0 for none).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local id = ARGV[1]
local lease = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])

redis.call('ZADD', KEYS[1], now + lease, id)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(lease * 4))
local instances = redis.call('ZCARD', KEYS[1])
local out = { instances }

for i = 1, 4 do
  local limit = tonumber(ARGV[3 + i])
  local want = tonumber(ARGV[7 + i])
  local granted, due = 0, 0
  if limit > 0 and want > 0 then
    local interval = 60000 / limit
    local tat = tonumber(redis.call('GET', KEYS[1 + i]) or '0')
    if tat < now then tat = now end
    -- Units due from tat, one every interval, up to the horizon (tat's own included).
    local room = 0
    if tat <= now + horizon then
      room = math.floor((now + horizon - tat) / interval) + 1
    end
    due = tat - now
    -- One instance takes at most its share of 30 % of a horizon (75 ms of the rate)
    -- at a time: the others get theirs at their next sync, whatever the order, and
    -- the queues of all instances drain evenly (measured: the p99 at saturation with
    -- three instances 2.6 s at a whole horizon, 1.95 s at 30 %, for 0.34 round trips
    -- per call instead of 0.32). An instance left without units syncs again at once,
    -- so an idle neighbour costs it nothing.
    local share = math.max(1, math.ceil(horizon * 0.3 / interval / instances))
    if room > 0 then
      granted = math.min(want, room, share)
      tat = tat + granted * interval
      redis.call('SET', KEYS[1 + i], string.format('%.3f', tat), 'PX', math.ceil(tat - now + horizon) + 1000)
    else
      -- The next unit enters the horizon then.
      due = tat - horizon - now
    end
  end
  out[#out + 1] = granted
  out[#out + 1] = math.floor(math.max(due, 0) * 1000)
end

local cap = tonumber(ARGV[12])
local wanted = tonumber(ARGV[13])
local in_flight = tonumber(ARGV[14])
local allowed = wanted
if cap > 0 then
  local holds = redis.call('HGETALL', KEYS[6])
  local others_held = 0
  local wants = {}
  for j = 1, #holds, 2 do
    local other = holds[j]
    if other ~= id then
      local held, w, expiry = string.match(holds[j + 1], '^(%d+):(%d+):([%d.]+)$')
      if expiry == nil or tonumber(expiry) < now then
        redis.call('HDEL', KEYS[6], other)
      else
        others_held = others_held + tonumber(held)
        wants[#wants + 1] = tonumber(w)
      end
    end
  end
  -- Water-filling: each instance's fair part of the cap, the small wants first.
  wants[#wants + 1] = wanted
  local mine = #wants
  local order = {}
  for j = 1, #wants do order[j] = j end
  table.sort(order, function(a, b) return wants[a] < wants[b] end)
  local remaining, left, fair = cap, #wants, 0
  for _, j in ipairs(order) do
    local part = math.min(wants[j], math.floor(remaining / left))
    if j == mine then fair = part end
    remaining = remaining - part
    left = left - 1
  end
  allowed = math.max(0, math.min(fair, cap - others_held))
  local held = math.max(allowed, in_flight)
  redis.call('HSET', KEYS[6], id, held .. ':' .. wanted .. ':' .. (now + lease))
  redis.call('PEXPIRE', KEYS[6], math.ceil(lease * 4))
end
out[#out + 1] = allowed

local pause = tonumber(redis.call('GET', KEYS[7]) or '0')
out[#out + 1] = math.floor(math.max(pause - now, 0))
return out
