-- A provider-wide pause for every instance: the pause key holds its end (ms), kept
-- only if later than the one in force, and the others are told on the channel.
-- KEYS: 1 the pause key, 2 the channel. ARGV: 1 pause ms, 2 the message.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local ms = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if now + ms > current then
  redis.call('SET', KEYS[1], tostring(now + ms), 'PX', math.max(1, math.ceil(ms)))
  redis.call('PUBLISH', KEYS[2], ARGV[2])
  return 1
end
return 0
