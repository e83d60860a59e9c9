--[[ settle: a primary's completion, failure or release, fenced, in one round trip.
KEYS[1]  lease key     KEYS[2]  fence key     KEYS[3]  result key
ARGV[1]  owner id (not read: the fence identifies the primary, see below)
ARGV[2]  the primary's fence
ARGV[3]  envelope to store under the result key ('' stores nothing)
ARGV[4]  result TTL in ms        ARGV[5]  channel of the token
ARGV[6]  message to publish ('' publishes 'V' .. ARGV[3]: the envelope goes over the wire once)
ARGV[7]  publish command: 'PUBLISH' (or 'SPUBLISH' on a cluster)
Accepted only while the fence still equals the primary's, and then the lease is the primary's or
absent: every lease holds the counter's value at the time it was written (claim.lua writes a new
lease with the next fence; renew.lua takes back only a lease whose fence is still the counter's),
so another owner's lease would come with another fence, and the lease is deleted unread. A
primary paused past its lease, whose token was claimed again, is refused. A stored result
carries its fence inside the envelope, so storing one deletes the fence key: a completed token
keeps one key. Every later settle of that token then finds no fence and is refused (a zombie's:
LeaseLost), except a repeat of this same settle (same owner, same envelope), which finds its
envelope stored and is accepted with nothing written. Once the result expires, a claim seeds the
fence from Redis' clock (fence.lua): every fence the token was given is at most the clock in
microseconds when it was given, a result TTL or more before, so the new fence is higher (as long
as the clock does not step back). A settle that stores nothing (a release, or a failure that is not cached) moves the
fence on, so the lease ends for good: a renewal still on its way is refused instead of taking the
lease back; claims and renewals keep the fence key alive for result TTL + 2 lease TTLs.
Returns
  {1, 'ok'}                   accepted: stored (if asked), lease deleted, message published
  {0, 'fence', current}       the token was claimed again since, or completed ('' if no fence)
]]
local current = redis.call('GET', KEYS[2])
if current ~= ARGV[2] then
  if not current and ARGV[3] ~= '' and redis.call('GET', KEYS[3]) == ARGV[3] then
    return {1, 'ok'}  -- a repeat: this settle stored the result and deleted the fence key
  end
  return {0, 'fence', current or ''}
end
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
  redis.call('DEL', KEYS[1], KEYS[2])
else
  redis.call('DEL', KEYS[1])
  redis.call('INCR', KEYS[2])
end
local message = ARGV[6]
if message == '' then
  message = 'V' .. ARGV[3]
end
redis.call(ARGV[7], ARGV[5], message)
return {1, 'ok'}
