--[[ release: an operator force-releases a token's lease; its waiters re-read and one takes over.
KEYS[1]  lease key     KEYS[2]  fence key
ARGV[1]  channel of the token
ARGV[2]  publish command: 'PUBLISH' (or 'SPUBLISH' on a cluster)
ARGV[3]  fence TTL in ms
The fence moves on (fence.lua), so the released primary, if it is still alive, is fenced off: its renewal
reports the lease lost and its settle is refused.
Returns
  {1, lease value}            the lease was held and is now deleted; waiters were told
  {0}                         no lease was held
]]
local lease = redis.call('GET', KEYS[1])
if not lease then
  return {0}
end
local fence = next_fence(KEYS[2], ARGV[3])
redis.call('DEL', KEYS[1])
redis.call(ARGV[2], ARGV[1], 'R' .. fence)
return {1, lease}
