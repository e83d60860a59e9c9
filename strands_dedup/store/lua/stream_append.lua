--[[ stream_append: a streaming primary appends chunks for its followers, fenced.
KEYS[1]  lease key     KEYS[2]  fence key     KEYS[3]  stream key (a Redis Stream)
ARGV[1]  owner id      ARGV[2]  fence of the primary's claim
ARGV[3]  TTL of the stream key after this append (ms)
ARGV[4]  channel       ARGV[5]  publish command
ARGV[6], ARGV[7], ...  pairs of (kind, data): kind "b" begins an attempt, "c" is a chunk,
         "e" ends the attempt (its result is stored next)
Each entry is XADDed with fields k (kind), f (fence), d (data); then "A<fence>" is published.
Returns 1, or 0 when the lease is no longer this owner's or the fence moved on (nothing written).
]]
local lease = redis.call('GET', KEYS[1])
if not lease or string.sub(lease, 1, #ARGV[1] + 1) ~= ARGV[1] .. '|' then
  return 0
end
if redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return 0
end
for i = 6, #ARGV, 2 do
  redis.call('XADD', KEYS[3], '*', 'k', ARGV[i], 'f', ARGV[2], 'd', ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call(ARGV[5], ARGV[4], 'A' .. ARGV[2])
return 1
