--[[ budget: reserve new keys for one identity and report the bytes it stored, in one round trip.
KEYS[1]  key counter of the current window (a string that expires with the window)
KEYS[2]  stored bytes per time bucket (a hash: bucket number -> bytes)
KEYS[3]  this call's marker (holds its grant, so a repeated call changes nothing more)
ARGV[1]  keys wanted (0: only report bytes)
ARGV[2]  most keys per window        ARGV[3]  window length in ms
ARGV[4]  bytes to add                ARGV[5]  most bytes stored at once
ARGV[6]  bucket length in ms         ARGV[7]  buckets a byte counts for
ARGV[8]  marker TTL in ms
Keys are granted while the window's count stays within its limit (fewer than wanted when only
those are left). Bytes are always added (they are stored already); the sum of the buckets still
counting tells whether new keys may store more. A bucket counts for ARGV[7] buckets after its
own, which covers the results' TTL. Uses Redis' clock (TIME): replicas get the script's effects.
Returns
  {granted keys, ms left in the key window, bytes stored, ms until the oldest bucket stops
   counting (0 when nothing counts)}
]]
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local bucket_ms = tonumber(ARGV[6])
local buckets = tonumber(ARGV[7])
local current = math.floor(now_ms / bucket_ms)

local repeated = redis.call('GET', KEYS[3])
local granted = 0
if repeated then
  granted = tonumber(repeated)
end

local count = tonumber(redis.call('GET', KEYS[1]) or '0')
if not repeated then
  local wanted = tonumber(ARGV[1])
  local limit = tonumber(ARGV[2])
  if wanted > 0 and count < limit then
    granted = math.min(wanted, limit - count)
    count = redis.call('INCRBY', KEYS[1], granted)
    if redis.call('PTTL', KEYS[1]) < 0 then
      redis.call('PEXPIRE', KEYS[1], ARGV[3])
    end
  end
end
local key_ms = redis.call('PTTL', KEYS[1])
if key_ms < 0 then
  key_ms = tonumber(ARGV[3])
end

local added = tonumber(ARGV[4])
if not repeated and added > 0 then
  redis.call('HINCRBY', KEYS[2], current, added)
  redis.call('PEXPIRE', KEYS[2], (buckets + 1) * bucket_ms)
end
local stored = 0
local oldest = nil
local fields = redis.call('HGETALL', KEYS[2])
for i = 1, #fields, 2 do
  local bucket = tonumber(fields[i])
  if bucket + buckets <= current then
    redis.call('HDEL', KEYS[2], fields[i])
  else
    stored = stored + tonumber(fields[i + 1])
    if oldest == nil or bucket < oldest then
      oldest = bucket
    end
  end
end
local byte_ms = 0
if oldest ~= nil then
  byte_ms = (oldest + buckets) * bucket_ms - now_ms
end

if not repeated then
  redis.call('SET', KEYS[3], granted, 'PX', ARGV[8])
end
return {granted, key_ms, stored, byte_ms}
