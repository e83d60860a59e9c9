--[[ session_renew: extend every session lease a process holds or waits with, in one round trip.
KEYS     for ticket i (1..n): KEYS[2i-1] the session's holders key, KEYS[2i] its qexp key
ARGV[1]  lease TTL in ms
ARGV[1+i] ticket i
An entry that expired but was not pruned yet is still present: nobody was admitted in its place
(admission prunes first), so it is simply extended.
Returns an array of n integers: 1 renewed, 0 lost (pruned after it expired, or released).
]]
local clock = redis.call('TIME')
local expiry = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000) + tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS / 2 do
  local ticket = ARGV[i + 1]
  if redis.call('ZSCORE', KEYS[2 * i - 1], ticket) then
    redis.call('ZADD', KEYS[2 * i - 1], 'XX', expiry, ticket)
    out[i] = 1
  elseif redis.call('ZSCORE', KEYS[2 * i], ticket) then
    redis.call('ZADD', KEYS[2 * i], 'XX', expiry, ticket)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
