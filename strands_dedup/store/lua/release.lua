--[[ release: an operator force-releases a token's lease; its waiters re-read and one takes over.
KEYS[1]  lease key
ARGV[1]  channel of the token
ARGV[2]  publish command: 'PUBLISH' (or 'SPUBLISH' on a cluster)
The released primary, if alive, is fenced off by the next claim (its settle is refused).
Returns
  {1, lease value}            the lease was held and is now deleted; waiters were told
  {0}                         no lease was held
]]
local lease = redis.call('GET', KEYS[1])
if not lease then
  return {0}
end
local fence = string.match(lease, '^[^|]*|(%d+)|')
redis.call('DEL', KEYS[1])
redis.call(ARGV[2], ARGV[1], 'R' .. (fence or '0'))
return {1, lease}
