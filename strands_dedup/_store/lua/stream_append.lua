--[[ stream_append: a streaming primary appends chunks for its followers, fenced, exactly once.
KEYS[1]  lease key     KEYS[2]  fence key     KEYS[3]  stream key (a Redis Stream)
ARGV[1]  owner id      ARGV[2]  fence of the primary's claim (decimal)
ARGV[3]  TTL of the stream key after this append (ms)
ARGV[4]  channel       ARGV[5]  publish command
ARGV[6]  sequence number of the first item (decimal): an attempt's items are numbered from 0
ARGV[7], ARGV[8], ...  pairs of (kind, data): kind "b" begins an attempt, "c" is a chunk,
         "e" ends the attempt (its data: the count and digest of its chunks)
Item n of the attempt is XADDed with the explicit id "<fence>-<n>" and fields k (kind), f (fence),
d (data). Redis refuses an id that is not above the stream's last one: that item is already there
(this batch, or a later one, ran before: a retried command whose first copy also ran) and is
skipped, so a repeat adds nothing; fences grow with every claim, so a new attempt's ids are above
the old ones.
"A<fence>" is published when something was added.
Returns 1, or 0 when the lease is no longer this owner's or the fence moved on (or is gone: a
stored result deleted it) (nothing written).
]]
local lease = redis.call('GET', KEYS[1])
if not lease or string.sub(lease, 1, #ARGV[1] + 1) ~= ARGV[1] .. '|' then
  return 0
end
if redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return 0
end
-- True when the stream's last entry id is at or above item `seq` of this attempt.
local function appended(seq)
  local top = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)[1]
  if not top then
    return false
  end
  local ms, n = string.match(top[1], '^(%d+)-(%d+)$')
  local fence = tonumber(ARGV[2])
  return tonumber(ms) > fence or (tonumber(ms) == fence and tonumber(n) >= seq)
end

local seq = tonumber(ARGV[6])
local added = 0
for i = 7, #ARGV, 2 do
  local reply = redis.pcall('XADD', KEYS[3], ARGV[2] .. '-' .. string.format('%d', seq),
    'k', ARGV[i], 'f', ARGV[2], 'd', ARGV[i + 1])
  if type(reply) == 'table' and reply.err then
    if not appended(seq) then
      return reply  -- refused for another reason (OOM, WRONGTYPE): the caller hears of it
    end
  else
    added = added + 1
  end
  seq = seq + 1
end
if added > 0 then
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
  redis.call(ARGV[5], ARGV[4], 'A' .. ARGV[2])
end
return 1
