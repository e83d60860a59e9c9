--[[ release: an operator force-releases a token's lease; its waiters re-read and one takes over.
KEYS[1]  lease key     KEYS[2]  fence key
ARGV[1]  channel of the token
ARGV[2]  publish command: 'PUBLISH' (or 'SPUBLISH' on a cluster)
ARGV[3]  fence TTL in ms
ARGV[4]  owner id of the lease to release ('' for whoever holds it)
The fence moves on (fence.lua), so the released primary, if it is still alive, is fenced off: its renewal
reports the lease lost and its settle is refused. With an owner id, a repeat (a retried command
whose first copy also ran) finds that lease gone and leaves alone the lease of whoever took over
since.
Returns
  {1, lease value}            the lease was held and is now deleted; waiters were told
  {0}                         no lease was held (by that owner)
]]
local lease = redis.call('GET', KEYS[1])
if not lease then
  return {0}
end
if ARGV[4] ~= '' and string.sub(lease, 1, #ARGV[4] + 1) ~= ARGV[4] .. '|' then
  return {0}
end
local fence = next_fence(KEYS[2], ARGV[3], clock_fence())
redis.call('DEL', KEYS[1])
redis.call(ARGV[2], ARGV[1], 'R' .. fence)
return {1, lease}
