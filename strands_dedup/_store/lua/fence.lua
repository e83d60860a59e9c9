--[[ fence: shared by the scripts that hand out a token's fence (loaded in front of them).
clock_fence() is Redis' clock in microseconds (TIME), as a decimal string: the seed of a missing
counter. next_fence(key, ttl, seeded) returns the token's next fence as a decimal string and
leaves it, with a TTL of `ttl` ms, in the counter at `key`. A missing counter (a new token; one
Redis lost: a restart without persistence, a failover, a flush, an eviction; its expiry; or a
completed token's, which settle.lua deleted when it stored the result) is seeded with `seeded`
(SET NX PX); an existing one is incremented. Every fence the token was given is at most the clock
in microseconds when it was given, so the seed is above all of them, as long as the clock does
not step back and a token gets fewer than a million fences a second.
Fences stay below 2^53, so Lua numbers hold them exactly; they are kept as strings here.
]]
local function clock_fence()
  local now = redis.call('TIME')
  return now[1] .. string.format('%06d', tonumber(now[2]))
end

local function next_fence(key, ttl, seeded)
  if redis.call('SET', key, seeded, 'NX', 'PX', ttl) then
    return seeded  -- a new token's first fence: one command, no INCR
  end
  local fence = redis.call('INCR', key)
  redis.call('PEXPIRE', key, ttl)
  return string.format('%d', fence)
end
