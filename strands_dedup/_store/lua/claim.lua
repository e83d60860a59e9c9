--[[ claim: replay a stored result, or take the token's lease, or report who holds it.
KEYS[1]  lease key     KEYS[2]  fence key     KEYS[3]  result key
ARGV[1]  owner id (hex, unique per call attempt)
ARGV[2]  lease TTL in ms
ARGV[3]  lease metadata (JSON; stored after "owner|fence|")
ARGV[4]  fence TTL in ms (outlives any result and lease of the token)
A new lease takes the next fence (fence.lua: above every earlier one, even after Redis lost
the counter). The lease is written first with the clock's seed (SET NX PX: no read before it);
when the counter already exists (a release, an uncached failure or a lapsed lease left it) the
fence is the counter's next value instead and the lease is written again with it, so a lease
always holds the counter's value at the time it was written.
Returns
  {'R', envelope}             a result is stored: replay it
  {'C', fence}                the lease is ours (new claim, or a retried claim finding its own lease)
  {'L', lease value, pttl}    another owner holds the lease, with pttl ms left
]]
local result = redis.call('GET', KEYS[3])
if result then
  return {'R', result}
end
local seeded = clock_fence()
if redis.call('SET', KEYS[1], ARGV[1] .. '|' .. seeded .. '|' .. ARGV[3], 'NX', 'PX', ARGV[2]) then
  local fence = next_fence(KEYS[2], ARGV[4], seeded)
  if fence ~= seeded then
    redis.call('SET', KEYS[1], ARGV[1] .. '|' .. fence .. '|' .. ARGV[3], 'PX', ARGV[2])
  end
  return {'C', fence}
end
local lease = redis.call('GET', KEYS[1])
local owner, held = string.match(lease, '^([^|]*)|(%d+)|')
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'C', held}
end
return {'L', lease, redis.call('PTTL', KEYS[1])}
