--[[ fence: shared by the scripts that hand out a token's fence (loaded in front of them).
next_fence(key, ttl) increments the fence counter at `key`, sets its TTL to `ttl` ms, and returns
the new fence as a decimal string. A missing counter (a new token, or one Redis lost: a restart
without persistence, a failover, a flush, an eviction, its expiry, or a stored result, whose
settle deleted it, that expired since) is seeded from Redis' clock
in microseconds, so the new fence is above every fence the token was given before, as long as
the clock does not step back and a token gets fewer than a million fences a second.
Fences stay below 2^53, so Lua numbers hold them exactly; they are kept as strings here.
]]
local function next_fence(key, ttl)
  local fence = redis.call('INCR', key)
  if fence == 1 then
    local now = redis.call('TIME')
    local seeded = now[1] .. string.format('%06d', tonumber(now[2]))
    redis.call('SET', key, seeded, 'PX', ttl)
    return seeded
  end
  redis.call('PEXPIRE', key, ttl)
  return string.format('%d', fence)
end
