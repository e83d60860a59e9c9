--[[ renew: extend every lease a process holds, in one round trip.
KEYS     for lease i (1..n): KEYS[3i-2] lease key, KEYS[3i-1] fence key, KEYS[3i] result key
ARGV[1]  lease TTL in ms
ARGV[2]  fence TTL in ms (a renewed lease keeps its fence counter alive too)
ARGV[2+i] the full value of lease i ("owner|fence|meta"): its owner and fence identify it
A lease that expired while nobody claimed the token since (fence unchanged, no result stored) is
taken back: nobody else can have run the call in between. Storing a result deletes the fence key
(settle.lua), so a completed token's lease is never taken back.
Returns an array of n integers: 1 renewed (or taken back), 0 lost.
]]
local ttl = ARGV[1]
local out = {}
for i = 1, #KEYS / 3 do
  local value = ARGV[i + 2]
  local owner, fence = string.match(value, '^([^|]*)|(%d+)|')
  local lease = redis.call('GET', KEYS[3 * i - 2])
  if lease then
    if string.sub(lease, 1, #owner + 1) == owner .. '|' then
      redis.call('PEXPIRE', KEYS[3 * i - 2], ttl)
      redis.call('PEXPIRE', KEYS[3 * i - 1], ARGV[2])
      out[i] = 1
    else
      out[i] = 0
    end
  elseif redis.call('GET', KEYS[3 * i - 1]) == fence and redis.call('EXISTS', KEYS[3 * i]) == 0 then
    redis.call('SET', KEYS[3 * i - 2], value, 'PX', ttl)
    redis.call('PEXPIRE', KEYS[3 * i - 1], ARGV[2])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
